"""Read and write diffusers/transformers weight folders: one `*.safetensors` file or shards + `*.index.json`.

Tensors are read one at a time through `safe_open` (memory-mapped), in their stored dtype (bf16 via
ml_dtypes), so a caller can cast and place each weight before touching the next: a bf16 checkpoint is never
materialised as a full fp32 copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from conversion.errors import ConversionError

__all__ = [
    "Checkpoint",
    "ConversionError",
    "open_checkpoint",
    "folder_fingerprint",
    "open_safetensors",
    "save_checkpoint",
    "weights_fingerprint",
]


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator[Any]:
    """`safe_open(path, framework="np")`: a truncated, corrupt or unreadable file is one ConversionError naming it
    (safetensors' own error names no file). Every reader of safetensors files opens them here."""
    try:
        with safe_open(path, framework="np") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as e:  # ValueError: a dtype numpy cannot hold
        raise ConversionError(f"{path}: not a readable safetensors file, truncated or corrupt? ({e})") from e


def read_json(path: str, what: str) -> Any:
    """A JSON file's content, or one ConversionError naming the file and `what` it should have been."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the {what} ({e.strerror})") from e
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


@dataclass
class Checkpoint:
    """A lazily read weight folder: `key -> file` and `key -> shape`; `load` reads one tensor."""

    folder: str
    files: dict[str, str]  # key -> path of the file that holds it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def load(self, key: str) -> np.ndarray:
        # Open per read: a handle kept open keeps its whole shard mapped, and peak RSS would grow with every
        # shard touched instead of staying near one tensor.
        with open_safetensors(self.files[key]) as f:
            return f.get_tensor(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.files:
            yield key, self.load(key)


def _weight_files(folder: str) -> tuple[list[str], str | None]:
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise ConversionError(f"{folder}: several shard indexes, cannot choose: {indexes}")
    if indexes:
        return [], os.path.join(folder, indexes[0])
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors weights and no *.safetensors.index.json")
    if len(files) > 1:
        raise ConversionError(f"{folder}: several *.safetensors files and no index to say which to use: {files}")
    return [os.path.join(folder, files[0])], None


def open_checkpoint(folder: str) -> Checkpoint:
    """Index every tensor in a weight folder. Raises ConversionError naming duplicates and missing shards."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: not a directory")
    single, index_path = _weight_files(folder)
    files: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    if index_path is not None:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{index_path}: unreadable shard index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise ConversionError(f"{index_path}: names shard file(s) that do not exist: {missing}")
        paths = [os.path.join(folder, s) for s in shards]
    else:
        weight_map = None
        paths = single
    for path in paths:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key in files:
                    problems.append(f"duplicate key {key!r} in {files[key]} and {path}")
                    continue
                files[key] = path
                shapes[key] = tuple(f.get_slice(key).get_shape())
    if weight_map is not None:
        for key, shard in weight_map.items():
            where = files.get(key)
            if where is None:
                problems.append(f"key {key!r} listed in {index_path} is not in {shard}")
            elif os.path.basename(where) != shard:
                problems.append(f"key {key!r} listed in {index_path} under {shard} but found in {where}")
        problems += [f"key {k!r} in {p} is not listed in {index_path}" for k, p in files.items() if k not in weight_map]
    if problems:
        raise ConversionError(f"{folder}: inconsistent checkpoint:\n  " + "\n  ".join(problems))
    return Checkpoint(folder=folder, files=files, shapes=shapes)


FINGERPRINT_CHUNKS = 8  # sampled stretches of each weight file, besides its header
FINGERPRINT_CHUNK_BYTES = 1 << 16


def _safetensors_digest(h: Any, path: str, name: str) -> None:
    """Feed `h` one safetensors file's name, size, header and `FINGERPRINT_CHUNKS` sampled stretches of its bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f"{name}\0{size}\0".encode())
        h.update(f.read(header_len))
        start, span = 8 + header_len, max(size - 8 - header_len, 0)
        for i in range(FINGERPRINT_CHUNKS):
            f.seek(start + span * i // FINGERPRINT_CHUNKS)
            h.update(f.read(FINGERPRINT_CHUNK_BYTES))


def weights_fingerprint(folder: str) -> str:
    """A cheap identity of a weight folder's contents: 16 hex digits.

    Hashes each weight file's name, size and safetensors header (every key, dtype, shape and offset) and
    `FINGERPRINT_CHUNKS` evenly spaced stretches of its tensor bytes: a few MB read from a 10 GB file, yet two
    folders with the same config but other weights (a fine-tune, another seed) differ with near certainty.
    Stored in training checkpoints and exports, so a resume or a `--fuse` export on other base weights is refused.
    """
    ckpt = open_checkpoint(folder)
    h = hashlib.sha256()
    for path in sorted(set(ckpt.files.values())):
        _safetensors_digest(h, path, os.path.basename(path))
    return h.hexdigest()[:16]


def folder_fingerprint(folder: str) -> str:
    """`weights_fingerprint`'s identity for any model folder (a text encoder, a tokenizer, a VAE): 16 hex digits.

    Every file under `folder`, by relative name: a `.safetensors` file as `weights_fingerprint` reads it, any
    other file (configs, tokenizer vocabularies) in full. The same content at another path has the same print.
    """
    h = hashlib.sha256()
    names = sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files)
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            _safetensors_digest(h, path, name)
        else:
            with open(path, "rb") as f:
                h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
                h.update(f.read())
    return h.hexdigest()[:16]


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors file's header with its `__metadata__` in sorted key order, in place. safetensors
    writes that map from a Rust HashMap, in another order on every call; the same tensors and metadata should be
    the same bytes (an export is reproducible, and compared by hash). Reordering keeps the header's length."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > size:  # another JSON style than serde's compact one: keep the file as written
            return
        f.seek(8)
        f.write(new.ljust(size))


def save_checkpoint(
    tensors: Mapping[str, np.ndarray],
    folder: str,
    *,
    name: str = "diffusion_pytorch_model",
    max_shard_bytes: int | None = 10 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write tensors as `{name}.safetensors`, or as shards + `{name}.safetensors.index.json` above the limit.

    `metadata`: string entries for every file's `__metadata__`, besides `format: pt`. Files are written under a
    temporary name and renamed, so a crash never leaves a half-written file that looks complete. Returns the
    written file paths.
    """
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.nbytes
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = np.asarray(value, order="C")  # keeps 0-d tensors 0-d (ascontiguousarray makes them (1,))
        size += nbytes
    if len(shards) == 1:
        names = [f"{name}.safetensors"]
    else:
        names = [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for shard, fname in zip(shards, names, strict=True):
        path = os.path.join(folder, fname)
        save_file(shard, path + ".tmp", metadata={**(metadata or {}), "format": "pt"})
        _sort_metadata(path + ".tmp")
        os.replace(path + ".tmp", path)
        written.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
            "weight_map": {k: fname for shard, fname in zip(shards, names, strict=True) for k in shard},
        }
        path = os.path.join(folder, f"{name}.safetensors.index.json")
        with open(path + ".tmp", "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
        written.append(path)
    return written
