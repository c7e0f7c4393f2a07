"""Upstream PyTorch weight files (`.pt`/`.pth` pickles) -> safetensors, once, offline.

The JAX run path reads only safetensors; torch is imported here alone, when a user converts a file such as
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or HPSv2's `HPS_v2.1_compressed.pt`. The safetensors file is
written beside the original under the same stem (`X.pth` -> `X.safetensors`), so a weights folder holds either.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from conversion.errors import ConversionError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def sha256(path: str) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_path(path: str) -> str:
    """Where the safetensors conversion of an upstream pickle lives: same folder, same stem."""
    return os.path.splitext(path)[0] + ".safetensors"


def _flatten(obj: Mapping, path: str) -> dict:
    """The tensor dict inside a checkpoint: a bare state dict, or one under `state_dict` / `model` (HPSv2 style)."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v  # DataParallel checkpoints prefix every key
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch pickle's tensors as numpy arrays (float32 kept, bf16/fp16 upcast to float32). Needs torch."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path}: reading a PyTorch pickle needs torch (only for this one-time conversion); "
            f"pip install torch, or convert it on another machine with `python -m conversion.torch_files {path}`"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors have many types; the cause is kept)
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    tensors = _flatten(obj, path)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy() for k, v in tensors.items()}


def convert(path: str, out: str | None = None) -> str:
    """Write `path`'s tensors as safetensors (default: beside it) with the source's name and sha256 as metadata."""
    out = out or safetensors_path(path)
    tensors = {k: np.asarray(v, order="C") for k, v in read_state_dict(path).items()}
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"source": os.path.basename(path), "source_sha256": sha256(path)})
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        sys.exit("usage: python -m conversion.torch_files FILE.pt [FILE.pth ...]  (writes FILE.safetensors beside)")
    for p in paths:
        print(convert(p))


if __name__ == "__main__":
    main()
