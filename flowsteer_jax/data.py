"""Prompt sources, the deterministic host-sharded prompt order, and an optional on-disk embedding cache.

Prompt files (`load_prompts`), chosen by extension (case-insensitive):

- `.txt`: one prompt per line, UTF-8; trailing whitespace (and the newline) is stripped, blank lines and comment
  lines (first non-blank character `#`) skipped.
- `.jsonl`: one JSON object per non-blank line with a string field `"prompt"` (other fields are ignored).
- `.parquet`: a `prompt` column of strings (read with pyarrow); no nulls.

Every problem raises `DataError` (an `InputError`: programs print it as one line, exit code 2) naming the file and,
where it applies, the line (1-based) or row (0-based); a file with no prompts is one too. Every program reads
prompt files with `load_prompts` (the trainer's `data.prompts`, `sample --prompts`).

Order (`PromptLoader`): the global stream of item indices is the concatenation of epochs, epoch `e` being
`np.random.default_rng([seed, e]).permutation(num_items)` (`arange` without shuffling). Global batch `i` is
stream items `[i * B, (i + 1) * B)`, so batches run across epoch boundaries and no item is dropped or repeated
within an epoch. The stream depends only on `(seed, num_items, shuffle)`, never on the host count, so a run
resumed from `state()` (the number of global batches consumed) continues the identical stream, on any number of
hosts. Host sharding: each global batch is cut into `process_count` equal contiguous parts and process `p`
gets part `p`; concatenating all processes' parts in process order gives the global batch.

Embedding cache (`EmbeddingCache`): for large runs the text encoders run once over all prompts and their
outputs are stored as one `.npy` per key (`prompt_embeds`, `pooled`, ...) with a `meta.json`. A build writes a
temporary sibling folder, `meta.json` last, then renames it into place, so a folder is complete exactly when it
has a `meta.json`, and a crashed build is never picked up. Reads are memory-mapped: only the requested rows are
read from disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from conversion.errors import InputError

log = logging.getLogger(__name__)

PROMPT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
META = "meta.json"


class DataError(InputError):
    """A prompt file, loader setting or embedding cache that cannot be used; the message says where."""


# ---------------------------------------------------------------------------------------------------------------
# Prompt files


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.end]!r})") from e


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without trailing whitespace) for each non-blank line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e}") from e
    # A BOM (Windows editors) would otherwise become part of the first prompt.
    data = data.removeprefix(b"\xef\xbb\xbf")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode(raw, path, lineno).rstrip()
        if text:
            yield lineno, text


def _load_jsonl(path: str) -> list[str]:
    prompts = []
    for lineno, text in _lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object")
        if "prompt" not in record:
            raise DataError(f'{path}: line {lineno} has no "prompt" field (fields: {sorted(record)})')
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f'{path}: line {lineno}: "prompt" is a JSON {type(prompt).__name__}, not a string')
        prompts.append(prompt)
    return prompts


def _load_parquet(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "prompt" not in schema.names:
            raise DataError(f"{path}: no 'prompt' column (columns: {schema.names})")
        column = pq.read_table(path, columns=["prompt"]).column("prompt")
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    # to_pylist decodes dictionary-encoded (categorical) strings too; checking values rather than the arrow
    # type gives one path for nulls and wrong types, both reported with their row.
    prompts = column.to_pylist()
    for row, value in enumerate(prompts):
        if value is None:
            raise DataError(f"{path}: row {row} (0-based) of column 'prompt' is null")
        if not isinstance(value, str):
            raise DataError(
                f"{path}: row {row} (0-based) of column 'prompt' is {type(value).__name__} ({value!r}), "
                f"not a string (column type {column.type})"
            )
    return prompts


def load_prompts(path: str) -> list[str]:
    """The prompts of a `.txt`, `.jsonl` or `.parquet` file, in file order (see the module docstring)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_EXTENSIONS:
        raise DataError(f"{path}: unknown prompt file extension {ext!r} (expected one of {PROMPT_EXTENSIONS})")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")
    if ext == ".txt":
        prompts = [text for _, text in _lines(path) if not text.lstrip().startswith("#")]
    elif ext == ".jsonl":
        prompts = _load_jsonl(path)
    else:
        prompts = _load_parquet(path)
    if not prompts:
        raise DataError(f"{path}: no prompts in the file (blank and # comment lines are skipped)")
    return prompts


def prompts_digest(prompts: Sequence[str]) -> str:
    """The sha256 of prompt texts in their order: what a run trained on or a row was sampled for, whichever file,
    path or format they came from."""
    h = hashlib.sha256()
    for text in prompts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Order


class PromptLoader:
    """Endless, deterministic, resumable batches of item indices; this process's slice of each global batch.

    `position` counts global batches consumed (the same on every host), so `state()` from any host resumes all.
    """

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        position: int = 0,
    ):
        if num_items < 1:
            raise DataError(f"num_items must be >= 1, got {num_items}")
        if global_batch < 1:
            raise DataError(f"global_batch must be >= 1, got {global_batch}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if global_batch % process_count:
            raise DataError(f"global_batch {global_batch} does not divide by process_count {process_count}")
        if seed < 0:
            # SeedSequence rejects negative entropy; say so here rather than at the first batch.
            raise DataError(f"seed must be >= 0, got {seed}")
        if position < 0:
            raise DataError(f"position must be >= 0, got {position}")
        self.num_items = int(num_items)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.position = int(position)
        self.local_batch = self.global_batch // self.process_count
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def from_state(
        cls, state: dict[str, int], *, shuffle: bool = True, process_index: int = 0, process_count: int = 1
    ) -> PromptLoader:
        """The loader `state()` was taken from, continuing where it stopped (on any number of processes)."""
        return cls(
            state["num_items"],
            state["global_batch"],
            seed=state["seed"],
            shuffle=shuffle,
            process_index=process_index,
            process_count=process_count,
            position=state["position"],
        )

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.position * self.global_batch // self.num_items

    def state(self) -> dict[str, int]:
        return dict(position=self.position, seed=self.seed, num_items=self.num_items, global_batch=self.global_batch)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                perm = np.arange(self.num_items)
            self._perms[epoch] = perm.astype(np.int64)
        return self._perms[epoch]

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Items [start, stop) of the global stream."""
        # Positions only move forward, so permutations of epochs before `start` are never needed again.
        first_epoch = start // self.num_items
        for e in [e for e in self._perms if e < first_epoch]:
            del self._perms[e]
        out = np.empty(stop - start, np.int64)
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self.num_items)
            take = min(self.num_items - offset, stop - pos)
            out[pos - start : pos - start + take] = self._perm(epoch)[offset : offset + take]
            pos += take
        return out

    def next(self) -> np.ndarray:
        """This process's `global_batch // process_count` indices (int64) of the next global batch."""
        # Only this process's slice is materialised: hosts never build each other's parts.
        start = self.position * self.global_batch + self.process_index * self.local_batch
        indices = self._stream(start, start + self.local_batch)
        self.position += 1
        return indices

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> np.ndarray:
        return self.next()


# ---------------------------------------------------------------------------------------------------------------
# Embedding cache


def _resolve_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        # bfloat16 & co. are ml_dtypes types (shipped with jax) that numpy cannot name by string.
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def _read_meta(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _matches(meta: dict[str, Any] | None, fingerprint: str, count: int) -> bool:
    return meta is not None and meta.get("fingerprint") == fingerprint and meta.get("count") == count


class EmbeddingCache:
    """Text-encoder outputs of a fixed list of prompts, one memory-mapped `.npy` per key, rows in prompt order."""

    def __init__(self, folder: str):
        """Open a complete cache (a folder with `meta.json`, as `build` leaves it)."""
        self.folder = os.fspath(folder)
        meta = _read_meta(self.folder)
        if meta is None:
            raise DataError(f"{self.folder}: not a complete embedding cache (no readable {META})")
        self.fingerprint: str = meta["fingerprint"]
        self.count: int = meta["count"]
        self.keys: list[str] = list(meta["keys"])
        self._arrays: dict[str, np.ndarray] = {}
        for key in self.keys:
            file = os.path.join(self.folder, f"{key}.npy")
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{file}: cannot open the cached embeddings: {e}") from e
            dtype = _resolve_dtype(meta["dtypes"][key])
            if array.dtype != dtype:
                array = array.view(dtype)  # the .npy header stores ml_dtypes types as raw bytes (|V2)
            shape = (self.count, *meta["shapes"][key])
            if array.shape != shape:
                raise DataError(f"{file}: shape {array.shape}, but {META} says {shape}")
            self._arrays[key] = array

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` of every key, read from disk (in memory, not memory-mapped)."""
        indices = np.asarray(indices, dtype=np.int64)
        return {key: np.asarray(array[indices]) for key, array in self._arrays.items()}

    @classmethod
    def build(
        cls,
        folder: str,
        prompts: list[str],
        encode: Callable[[list[str]], dict[str, np.ndarray]],
        *,
        batch_size: int = 64,
        fingerprint: str,
        is_writer: bool = True,
        timeout_s: float = 24 * 3600.0,
        poll_s: float = 10.0,
    ) -> EmbeddingCache:
        """Open the cache in `folder` if it is complete for (`fingerprint`, `len(prompts)`), else build it.

        `encode(prompts)` returns arrays with one leading row per prompt. It is called on `batch_size` prompts at
        a time (the last batch padded with its last prompt), so with the batch size the encoder is called with
        without the cache, the cached rows are bit-identical to that (the encoders' numerics depend on the batch
        size, not on the other rows). `fingerprint` should identify everything the embeddings depend on (prompt
        file, encoders, max sequence length, dtype, batch size). In multi-host
        runs exactly one process passes `is_writer=True`; the others wait up to `timeout_s` for its cache.
        """
        folder = os.path.normpath(os.fspath(folder))
        count = len(prompts)
        if count == 0:
            raise DataError(f"{folder}: no prompts to cache")
        if batch_size < 1:
            raise DataError(f"{folder}: batch_size must be >= 1, got {batch_size}")
        meta = _read_meta(folder)
        if _matches(meta, fingerprint, count):
            try:
                return cls(folder)
            except DataError as e:
                if not is_writer:
                    raise
                log.warning("%s; rebuilding the embedding cache", e)
        elif meta is not None and is_writer:
            log.warning(
                "%s: embedding cache is for fingerprint %r with %s prompts, not %r with %d; rebuilding",
                folder,
                meta.get("fingerprint"),
                meta.get("count"),
                fingerprint,
                count,
            )
        if not is_writer:
            return cls._wait(folder, fingerprint, count, timeout_s, poll_s)
        cls._write(folder, prompts, encode, batch_size, fingerprint)
        return cls(folder)

    @classmethod
    def _wait(cls, folder: str, fingerprint: str, count: int, timeout_s: float, poll_s: float) -> EmbeddingCache:
        deadline = time.monotonic() + timeout_s
        log.info("%s: waiting for the writer process to build the embedding cache", folder)
        while not _matches(_read_meta(folder), fingerprint, count):
            if time.monotonic() >= deadline:
                raise DataError(
                    f"{folder}: no complete embedding cache for fingerprint {fingerprint!r} with {count} prompts "
                    f"after waiting {timeout_s:.0f} s (did the writer process fail?)"
                )
            time.sleep(poll_s)
        return cls(folder)

    @staticmethod
    def _write(
        folder: str,
        prompts: list[str],
        encode: Callable[[list[str]], dict[str, np.ndarray]],
        batch_size: int,
        fingerprint: str,
    ) -> None:
        from tqdm.auto import tqdm

        parent, name = os.path.split(folder)
        parent = parent or "."
        os.makedirs(parent, exist_ok=True)
        # Temporary folders are siblings (same filesystem, so the final rename is atomic) whose names never
        # equal `folder`: a crashed build leaves one behind that no reader ever opens. Earlier crashes' are
        # removed here; only one writer builds a given folder, so none of them is still in use.
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.tmp-"):
                log.info("removing a leftover temporary embedding cache %s", os.path.join(parent, entry))
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        tmp = os.path.join(parent, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        count = len(prompts)
        arrays: dict[str, np.ndarray] = {}
        try:
            with tqdm(total=count, desc="caching text embeddings", unit="prompt") as bar:
                for start in range(0, count, batch_size):
                    batch = prompts[start : start + batch_size]
                    # The last batch is padded to the others' size: the encoders' last bits depend on it.
                    padded = batch + batch[-1:] * (batch_size - len(batch))
                    out = {key: np.asarray(value) for key, value in encode(padded).items()}
                    if not arrays:
                        if not out:
                            raise DataError(f"{folder}: encode returned no arrays")
                        for key, value in out.items():
                            file = os.path.join(tmp, f"{key}.npy")
                            shape = (count, *value.shape[1:])
                            arrays[key] = np.lib.format.open_memmap(file, mode="w+", dtype=value.dtype, shape=shape)
                    if out.keys() != arrays.keys():
                        raise DataError(f"{folder}: encode returned keys {sorted(out)}, earlier {sorted(arrays)}")
                    for key, value in out.items():
                        expected = (len(padded), *arrays[key].shape[1:])
                        if value.shape != expected:
                            raise DataError(
                                f"{folder}: encode returned {key} of shape {value.shape} for prompts "
                                f"[{start}, {start + len(padded)}), expected {expected}"
                            )
                        arrays[key][start : start + len(batch)] = value[: len(batch)]
                    bar.update(len(batch))
            meta = dict(
                fingerprint=fingerprint,
                count=count,
                keys=list(arrays),
                shapes={key: list(a.shape[1:]) for key, a in arrays.items()},
                dtypes={key: a.dtype.name for key, a in arrays.items()},
            )
            for array in arrays.values():
                array.flush()
            arrays.clear()  # closes the memmaps before the rename
            # meta.json last: its presence is what marks the folder complete.
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.lexists(folder):
                # A directory cannot be renamed over a non-empty one; move the stale cache aside first.
                old = os.path.join(parent, f".{name}.tmp-old-{uuid.uuid4().hex[:8]}")
                os.rename(folder, old)
            os.rename(tmp, folder)
        except BaseException:
            arrays.clear()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("%s: cached %s for %d prompts", folder, ", ".join(meta["keys"]), count)
