"""pytorch-fid's FID InceptionV3 (`fid_inception_v3().state_dict()`) <-> flowsteer_jax `InceptionV3`.

The architecture is written once here, as data: `STEM` and `MIXED` name every `BasicConv2d` (conv without bias +
BatchNorm2d(eps=0.001)) with its shape, and `flowsteer_jax.models.inception` builds its modules from the same specs,
so the model and the key table cannot drift. Flax paths equal the torch module names (`Mixed_5b.branch1x1.conv`),
with the leaf renamed: `weight` -> `kernel` (conv, transposed) or `scale` (BatchNorm), `running_mean` -> `mean`,
`running_var` -> `var`.

The upstream file (`pt_inception-2015-12-05-6726825d.pth`) also holds the 1008-way classifier `fc.*` and, when
saved by a newer torch, each BatchNorm's `num_batches_tracked`. The pool3 features use neither: `SKIPPED` lists them
by name and they are dropped before the strict check; every other unknown, missing or mis-shaped key is an error.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from conversion.errors import ConversionError
from conversion.safetensors_io import Checkpoint, open_safetensors
from conversion.table import Entry, check_checkpoint

SOURCE = "pytorch-fid's fid_inception_v3() state dict"
FEATURES = 2048  # pool3
BN_EPS = 1e-3  # torchvision's BasicConv2d
RESIZE = 299


class Conv(NamedTuple):
    """One torchvision `BasicConv2d`: conv (no bias) + BatchNorm + ReLU."""

    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)


def _k(n: int) -> tuple[int, int]:
    return (n, n)


STEM: dict[str, Conv] = {
    "Conv2d_1a_3x3": Conv(3, 32, _k(3), stride=2),
    "Conv2d_2a_3x3": Conv(32, 32, _k(3)),
    "Conv2d_2b_3x3": Conv(32, 64, _k(3), padding=_k(1)),
    # maxpool 3x3 / 2
    "Conv2d_3b_1x1": Conv(64, 80, _k(1)),
    "Conv2d_4a_3x3": Conv(80, 192, _k(3)),
    # maxpool 3x3 / 2
}

# (name, block kind, in_channels, pool_features or channels_7x7), in forward order. A/C/E_1/E_2 are pytorch-fid's
# FIDInception* blocks, B and D torchvision's InceptionB/InceptionD.
MIXED: tuple[tuple[str, str, int, int | None], ...] = (
    ("Mixed_5b", "A", 192, 32),
    ("Mixed_5c", "A", 256, 64),
    ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, None),
    ("Mixed_6b", "C", 768, 128),
    ("Mixed_6c", "C", 768, 160),
    ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, None),
    ("Mixed_7b", "E_1", 1280, None),
    ("Mixed_7c", "E_2", 2048, None),
)


def mixed_convs(kind: str, cin: int, arg: int | None) -> dict[str, Conv]:
    """The convs of one Mixed block, by torchvision attribute name (torchvision/models/inception.py)."""
    row, col = (1, 7), (7, 1)
    if kind == "A":
        return {
            "branch1x1": Conv(cin, 64, _k(1)),
            "branch5x5_1": Conv(cin, 48, _k(1)),
            "branch5x5_2": Conv(48, 64, _k(5), padding=_k(2)),
            "branch3x3dbl_1": Conv(cin, 64, _k(1)),
            "branch3x3dbl_2": Conv(64, 96, _k(3), padding=_k(1)),
            "branch3x3dbl_3": Conv(96, 96, _k(3), padding=_k(1)),
            "branch_pool": Conv(cin, arg, _k(1)),
        }
    if kind == "B":
        return {
            "branch3x3": Conv(cin, 384, _k(3), stride=2),
            "branch3x3dbl_1": Conv(cin, 64, _k(1)),
            "branch3x3dbl_2": Conv(64, 96, _k(3), padding=_k(1)),
            "branch3x3dbl_3": Conv(96, 96, _k(3), stride=2),
        }
    if kind == "C":
        c7 = arg
        return {
            "branch1x1": Conv(cin, 192, _k(1)),
            "branch7x7_1": Conv(cin, c7, _k(1)),
            "branch7x7_2": Conv(c7, c7, row, padding=(0, 3)),
            "branch7x7_3": Conv(c7, 192, col, padding=(3, 0)),
            "branch7x7dbl_1": Conv(cin, c7, _k(1)),
            "branch7x7dbl_2": Conv(c7, c7, col, padding=(3, 0)),
            "branch7x7dbl_3": Conv(c7, c7, row, padding=(0, 3)),
            "branch7x7dbl_4": Conv(c7, c7, col, padding=(3, 0)),
            "branch7x7dbl_5": Conv(c7, 192, row, padding=(0, 3)),
            "branch_pool": Conv(cin, 192, _k(1)),
        }
    if kind == "D":
        return {
            "branch3x3_1": Conv(cin, 192, _k(1)),
            "branch3x3_2": Conv(192, 320, _k(3), stride=2),
            "branch7x7x3_1": Conv(cin, 192, _k(1)),
            "branch7x7x3_2": Conv(192, 192, row, padding=(0, 3)),
            "branch7x7x3_3": Conv(192, 192, col, padding=(3, 0)),
            "branch7x7x3_4": Conv(192, 192, _k(3), stride=2),
        }
    if kind in ("E_1", "E_2"):
        return {
            "branch1x1": Conv(cin, 320, _k(1)),
            "branch3x3_1": Conv(cin, 384, _k(1)),
            "branch3x3_2a": Conv(384, 384, (1, 3), padding=(0, 1)),
            "branch3x3_2b": Conv(384, 384, (3, 1), padding=(1, 0)),
            "branch3x3dbl_1": Conv(cin, 448, _k(1)),
            "branch3x3dbl_2": Conv(448, 384, _k(3), padding=_k(1)),
            "branch3x3dbl_3a": Conv(384, 384, (1, 3), padding=(0, 1)),
            "branch3x3dbl_3b": Conv(384, 384, (3, 1), padding=(1, 0)),
            "branch_pool": Conv(cin, 192, _k(1)),
        }
    raise ValueError(f"unknown Inception block kind {kind!r}")


def all_convs() -> dict[str, Conv]:
    """Every BasicConv2d of the pool3 network by dotted torch module path (`Mixed_5b.branch1x1`)."""
    convs = dict(STEM)
    for name, kind, cin, arg in MIXED:
        convs.update({f"{name}.{branch}": c for branch, c in mixed_convs(kind, cin, arg).items()})
    return convs


# BatchNorm2d tensor -> NNX BatchNorm variable
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def param_table() -> list[Entry]:
    """Every tensor the pool3 features need, torch key <-> Flax path."""
    table = []
    for path, c in all_convs().items():
        parts = tuple(path.split("."))
        table.append(Entry(f"{path}.conv.weight", (*parts, "conv", "kernel"), (c.cout, c.cin, *c.kernel), "conv"))
        table += [Entry(f"{path}.bn.{t}", (*parts, "bn", f), (c.cout,)) for t, f in _BN_LEAVES.items()]
    return table


# In the upstream state dict but unused by pool3 features (the classifier, BatchNorm's step counters).
SKIPPED: frozenset[str] = frozenset(
    ["fc.weight", "fc.bias"] + [f"{path}.bn.num_batches_tracked" for path in all_convs()]
)


def open_weights(path: str) -> Checkpoint:
    """One `.safetensors` conversion of the upstream file, strictly checked against `param_table()` (`SKIPPED` keys
    dropped): one ConversionError names every unknown, missing or mis-shaped key."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    files, shapes = {}, {}
    with open_safetensors(path) as f:
        for key in f.keys():
            if key not in SKIPPED:
                files[key] = path
                shapes[key] = tuple(f.get_slice(key).get_shape())
    ckpt = Checkpoint(folder=path, files=files, shapes=shapes)
    check_checkpoint(ckpt, param_table(), SOURCE)
    return ckpt
