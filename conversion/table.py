"""A declarative two-way mapping between PyTorch state-dict keys and Flax parameter paths.

Each model family builds a list of `Entry` from its config: the PyTorch key, the Flax path, the PyTorch
shape and a layout `kind`. The same list drives loading (torch -> flax), export (flax -> torch), the strict
checks and the tests, so the mapping cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from conversion.safetensors_io import Checkpoint, ConversionError

FlaxPath = tuple[str | int, ...]


def _linear_to_flax(w: np.ndarray) -> np.ndarray:
    return w.T  # torch (out, in) -> flax (in, out)


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)


def _conv_to_torch(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


def _same(w: np.ndarray) -> np.ndarray:
    return w


# kind -> (torch -> flax, flax -> torch, torch shape -> flax shape)
LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "linear": (_linear_to_flax, _linear_to_flax, lambda s: s[::-1]),
    "conv": (_conv_to_flax, _conv_to_torch, lambda s: (s[2], s[3], s[1], s[0])),
    "same": (_same, _same, lambda s: s),
}


@dataclass(frozen=True)
class Entry:
    """`part=(i, n)`: this Flax parameter is the i-th of n equal slices along axis 0 of a packed torch tensor
    (open_clip's `in_proj_weight` holds q, k and v); `torch_shape` stays the packed tensor's, so the strict checks
    see one key, and `to_torch_state` concatenates the parts back."""

    torch_key: str
    flax_path: FlaxPath
    torch_shape: tuple[int, ...]
    kind: str = "same"
    part: tuple[int, int] | None = None

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The torch shape of this entry's slice (the whole tensor when it is not packed)."""
        if self.part is None:
            return self.torch_shape
        return (self.torch_shape[0] // self.part[1], *self.torch_shape[1:])

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(LAYOUTS[self.kind][2](self.part_shape))

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        if self.part is not None:
            n = self.part_shape[0]
            w = w[self.part[0] * n : (self.part[0] + 1) * n]
        return LAYOUTS[self.kind][0](w)

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        """The torch layout of `w`: the slice `part` names, for a packed entry."""
        return np.asarray(LAYOUTS[self.kind][1](w), order="C")


def path_str(path: FlaxPath) -> str:
    return ".".join(str(p) for p in path)


def _report(what: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(f"{what}:\n  " + "\n  ".join(problems))


def check_checkpoint(ckpt: Checkpoint, table: Iterable[Entry], config_path: str) -> None:
    """Raise one ConversionError listing every unknown, missing or wrongly shaped key (with its file)."""
    table = list(table)
    expected = {e.torch_key: e for e in table}
    problems = [
        f"unknown key {k!r} in {ckpt.files[k]} (not produced by {config_path})"
        for k in ckpt.keys()
        if k not in expected
    ]
    problems += [
        f"missing key {k!r}: {config_path} requires it, no file in {ckpt.folder} has it"
        for k in expected
        if k not in ckpt.files
    ]
    for k, e in expected.items():
        if k in ckpt.files and ckpt.shape(k) != e.torch_shape:
            problems.append(
                f"shape mismatch for {k!r} in {ckpt.files[k]}: file has {ckpt.shape(k)}, "
                f"{config_path} implies {e.torch_shape}"
            )
    _report(f"{ckpt.folder}: checkpoint does not match {config_path}", problems)


def to_torch_state(flat: Mapping[FlaxPath, np.ndarray], table: Iterable[Entry]) -> dict[str, np.ndarray]:
    """Flax flat params -> PyTorch state dict (strict both ways, shapes checked)."""
    table = list(table)
    by_path = {e.flax_path: e for e in table}
    problems = [f"unknown Flax parameter {path_str(p)!r}" for p in flat if p not in by_path]
    problems += [f"missing Flax parameter {path_str(p)!r}" for p in by_path if p not in flat]
    problems += [
        f"shape mismatch for {path_str(p)!r}: has {tuple(np.shape(flat[p]))}, expected {e.flax_shape}"
        for p, e in by_path.items()
        if p in flat and tuple(np.shape(flat[p])) != e.flax_shape
    ]
    _report("Flax parameters do not match the config", problems)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for e in table:
        parts.setdefault(e.torch_key, []).append(
            (e.part[0] if e.part else 0, e.to_torch(np.asarray(flat[e.flax_path])))
        )
    return {
        k: v[0][1] if len(v) == 1 else np.concatenate([w for _, w in sorted(v, key=lambda p: p[0])])
        for k, v in parts.items()
    }
