"""Prompt sources, the deterministic host-sharded prompt order, and an optional on-disk embedding cache.

Prompts (`open_prompts(spec, text_column)`, a lazy `PromptSet`): `spec` is a prompt file, a glob of them
(`shards/*.parquet`, `**` recursive), a folder of them (its prompt files, sorted by name), or a folder written by
`datasets.Dataset.save_to_disk` (`dataset_info.json` + `state.json` + arrow files, read with pyarrow). Files are
concatenated in sorted order. Formats, by extension (case-insensitive):

- `.txt`: one prompt per line, UTF-8; trailing whitespace (and the newline) is stripped, blank lines and comment
  lines (first non-blank character `#`) skipped. UTF-16 (NUL bytes, or its byte-order mark) is refused, in `.jsonl`
  too.
- `.jsonl`: one JSON object per non-blank line with a string field `text_column` (other fields are ignored).
- `.parquet`: a `text_column` column of strings (read with pyarrow); no nulls. So is a `datasets` folder's.

`text_column` defaults to `"prompt"` (`data.text_column`; name the column your shards use). Nothing is loaded
whole: opening checks every file (a `.txt`/`.jsonl` in one streamed pass that keeps only each prompt's
byte offset; a parquet file from its footer: row counts, the column's type and null counts; an arrow file
memory-mapped), and `PromptSet.take(indices)` reads just those rows (a parquet file by row group, its smallest
readable unit). `load_prompts` is the list of a few (`sample --prompts`).

Every problem raises `DataError` (an `InputError`: programs print it as one line, exit code 2) naming the file and,
where it applies, the line (1-based) or row (0-based); a file with no prompts is one too.

Order (`PromptLoader`): the global stream of item indices is the concatenation of epochs, epoch `e` being
`np.random.default_rng([seed, e]).permutation(num_items)` (`arange` without shuffling). Global batch `i` is
stream items `[i * B, (i + 1) * B)`, so batches run across epoch boundaries and no item is dropped or repeated
within an epoch. The stream depends only on `(seed, num_items, shuffle)`, never on the host count, so a run
resumed from `state()` (the number of global batches consumed) continues the identical stream, on any number of
hosts. Host sharding: each global batch is cut into `process_count` equal contiguous parts and process `p`
gets part `p`; concatenating all processes' parts in process order gives the global batch.

Embedding cache (`EmbeddingCache`): for large runs the text encoders run once over all prompts and their
outputs are stored as one `.npy` per key (`prompt_embeds`, `pooled`, ...) with a `meta.json`. Before a build its
size is logged, and refused past `data.cache_max_gib` (SD3's embeddings take about 2.6 MiB per prompt in bf16 at
256 T5 tokens: millions of prompts take terabytes). A build writes a temporary sibling folder, `meta.json` last,
then renames it into place, so a folder is complete exactly when it has a `meta.json`, and a crashed build is
never picked up. Reads are memory-mapped: only the requested rows are
read from disk.
"""

from __future__ import annotations

import glob
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


def _jsonl_text(text: str, path: str, lineno: int, column: str) -> str:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object")
    if column not in record:
        raise DataError(f'{path}: line {lineno} has no "{column}" field (fields: {sorted(record)})')
    prompt = record[column]
    if not isinstance(prompt, str):
        raise DataError(f'{path}: line {lineno}: "{column}" is a JSON {type(prompt).__name__}, not a string')
    return prompt


class _LineShard:
    """A `.txt` or `.jsonl` file, indexed in one streamed pass (every line checked): only the byte offset of each
    prompt's line stays in memory, and a prompt is read from disk when asked for."""

    def __init__(self, path: str, column: str):
        self.path, self.column, self.jsonl = path, column, path.lower().endswith(".jsonl")
        offsets, lineno, offset = [], 0, 0
        try:
            with open(path, "rb") as f:
                for raw in f:
                    lineno += 1
                    start = offset
                    offset += len(raw)
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM (Windows editors)
                        raw, start = raw[3:], start + 3
                    # UTF-16 without a BOM is valid UTF-8 with a NUL after every ASCII letter: it would train on
                    # "a\0 \0c\0a\0t".
                    if b"\x00" in raw or (lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff"))):
                        raise DataError(
                            f"{path}: line {lineno} has NUL bytes or a UTF-16 byte-order mark: UTF-16 text? save it "
                            "as UTF-8"
                        )
                    text = self._text(raw, lineno)
                    if text is not None:
                        offsets.append(start)
        except OSError as e:
            raise DataError(f"{path}: cannot read the file: {e}") from e
        self.offsets = np.asarray(offsets, np.int64)

    def _text(self, raw: bytes, lineno: int) -> str | None:
        """The prompt of a line, None for a blank (or `.txt` comment) line; a bad line raises naming it."""
        text = _decode(raw.rstrip(b"\r\n"), self.path, lineno).rstrip()
        if not text or (not self.jsonl and text.lstrip().startswith("#")):
            return None
        return _jsonl_text(text, self.path, lineno, self.column) if self.jsonl else text

    def __len__(self) -> int:
        return len(self.offsets)

    def take(self, rows: np.ndarray) -> list[str]:
        out = []
        with open(self.path, "rb") as f:
            for row in rows:
                f.seek(int(self.offsets[row]))
                out.append(self._text(f.readline(), -1))
        return out

    def fingerprint(self, h) -> None:
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _first_bad(path: str, column: str, values: list, offset: int, arrow_type) -> DataError:
    for row, value in enumerate(values, start=offset):
        if value is None:
            return DataError(f"{path}: row {row} (0-based) of column '{column}' is null")
        if not isinstance(value, str):
            return DataError(
                f"{path}: row {row} (0-based) of column '{column}' is {type(value).__name__} ({value!r}), "
                f"not a string (column type {arrow_type})"
            )
    return DataError(f"{path}: column '{column}' holds nulls or non-strings (column type {arrow_type})")


class _ParquetShard:
    """A parquet file: counts, types and nulls come from its footer; a prompt is read with its row group (the
    smallest unit parquet reads), and the last few row groups read are kept."""

    KEEP = 4  # row groups held per file

    def __init__(self, path: str, column: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.column = path, column
        try:
            self.file = pq.ParquetFile(path)
            schema = self.file.schema_arrow
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
        if column not in schema.names:
            raise DataError(f"{path}: no '{column}' column (columns: {schema.names})")
        md = self.file.metadata
        index = schema.get_field_index(column)
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self.starts = np.cumsum([0, *sizes]).astype(np.int64)
        self._groups: dict[int, list] = {}
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(index).statistics
            nulls = stats.null_count if stats is not None and stats.has_null_count else None
            if not _is_text(schema.field(column).type) or nulls is None or nulls > 0:
                # Not provably all strings from the footer: read this group's values to name the bad row.
                values = self._group(g)
                if any(not isinstance(v, str) for v in values):
                    raise _first_bad(path, column, values, int(self.starts[g]), schema.field(column).type)

    def _group(self, g: int) -> list:
        if g not in self._groups:
            if len(self._groups) >= self.KEEP:
                self._groups.pop(next(iter(self._groups)))
            self._groups[g] = self.file.read_row_group(g, columns=[self.column]).column(0).to_pylist()
        return self._groups[g]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray) -> list[str]:
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        return [self._group(int(g))[int(r - self.starts[g])] for r, g in zip(rows, groups, strict=True)]

    def fingerprint(self, h) -> None:
        # The footer (schema, row counts, offsets and min/max statistics of every column chunk) and the size: the
        # files may carry images too (FLUX-Reason-6M), far too much to hash whole at every start.
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            f.seek(size - 8)
            footer = int.from_bytes(f.read(4), "little")
            f.seek(max(size - 8 - footer, 0))
            h.update(f.read())
        h.update(str(size).encode())


class _ArrowShard:
    """An arrow file of a `datasets` `save_to_disk` folder, memory-mapped: rows stay on disk until asked for."""

    def __init__(self, path: str, column: str, fingerprint: str):
        import pyarrow as pa

        self.path, self.column, self._fingerprint = path, column, fingerprint
        try:
            source = pa.memory_map(path)
            try:
                table = pa.ipc.open_stream(source).read_all()  # what `datasets` writes
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable arrow file: {e}") from e
        if column not in table.column_names:
            raise DataError(f"{path}: no '{column}' column (columns: {table.column_names})")
        self.values = table.column(column)
        if not _is_text(self.values.type) or self.values.null_count:
            raise _first_bad(path, column, self.values.to_pylist(), 0, self.values.type)

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: np.ndarray) -> list[str]:
        return self.values.take(rows).to_pylist()

    def fingerprint(self, h) -> None:
        h.update(f"{self._fingerprint}:{os.path.getsize(self.path)}".encode())


DATASETS_FILES = ("dataset_info.json", "state.json")  # what marks a `datasets.save_to_disk` folder


def _dataset_shards(folder: str, column: str) -> list[_ArrowShard]:
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}/state.json: not a datasets save_to_disk state ({e!r})") from e
    fingerprint = str(state.get("_fingerprint", ""))
    return [_ArrowShard(os.path.join(folder, name), column, fingerprint) for name in names]


def _files(spec: str) -> list[str]:
    """The prompt files a `data.prompts` value names: a file, a folder's prompt files, or a glob's."""
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        what = "the glob matches"
    elif os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec) if os.path.isfile(os.path.join(spec, n)))
        what = "the folder holds"
    else:
        ext = os.path.splitext(spec)[1].lower()
        if ext not in PROMPT_EXTENSIONS:
            raise DataError(f"{spec}: unknown prompt file extension {ext!r} (expected one of {PROMPT_EXTENSIONS})")
        if not os.path.exists(spec):
            raise DataError(f"{spec}: no such file")
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: not a regular file")
        return [spec]
    prompt_files = [p for p in files if os.path.splitext(p)[1].lower() in PROMPT_EXTENSIONS]
    if not prompt_files:
        shown = [os.path.basename(p) for p in files[:5]]
        raise DataError(f"{spec}: {what} no {'/'.join(PROMPT_EXTENSIONS)} files (found: {shown or 'nothing'})")
    return prompt_files


class PromptSet(Sequence[str]):
    """The prompts of one or more files, in order, read lazily: `len`, `ps[i]`, `ps[a:b]` and `take(indices)`
    read only the rows asked for (millions of prompts never sit in memory). Open one with `open_prompts`."""

    def __init__(self, source: str, shards: list):
        self.source = source
        self.shards = shards
        self.starts = np.cumsum([0, *(len(s) for s in shards)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The prompts at `indices` (global, 0-based), in that order."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"prompt indices outside [0, {len(self)})")
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out: list[str] = [""] * len(indices)
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            for i, text in zip(where, self.shards[s].take(indices[where] - self.starts[s]), strict=True):
                out[i] = text
        return out

    def __iter__(self) -> Iterator[str]:
        for shard in self.shards:
            for start in range(0, len(shard), 4096):
                yield from shard.take(np.arange(start, min(start + 4096, len(shard))))

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(np.arange(*item.indices(len(self))))
        index = int(item) + (len(self) if int(item) < 0 else 0)
        return self.take([index])[0]

    def fingerprint(self) -> str:
        """Identifies the prompts (for the embedding cache): each file's name and content (parquet: its footer and
        size; a `datasets` folder: its own fingerprint), and the column."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(f"{os.path.basename(shard.path)}:{len(shard)}:{getattr(shard, 'column', '')}".encode())
            shard.fingerprint(h)
        return h.hexdigest()


def open_prompts(spec: str, text_column: str = "prompt") -> PromptSet:
    """The prompts `spec` names (see the module docstring): checked now, read when asked for."""
    spec = os.fspath(spec)
    if os.path.isdir(spec) and all(os.path.isfile(os.path.join(spec, n)) for n in DATASETS_FILES):
        shards = _dataset_shards(spec, text_column)
    else:
        shards = []
        for path in _files(spec):
            shard = _ParquetShard if path.lower().endswith(".parquet") else _LineShard
            shards.append(shard(path, text_column))
    prompts = PromptSet(spec, shards)
    if not len(prompts):
        raise DataError(f"{spec}: no prompts in the file (blank and # comment lines are skipped)")
    return prompts


def load_prompts(path: str, text_column: str = "prompt") -> list[str]:
    """All the prompts `path` names, in order, as a list (for the few a program samples; training streams them
    with `open_prompts`)."""
    return list(open_prompts(path, text_column))


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


def check_cache_size(folder: str, count: int, one: dict[str, np.ndarray], max_gib: float | None) -> float:
    """The size in GiB of an embedding cache of `count` prompts, given the encoder's output `one` for one prompt;
    logged, and refused past `max_gib` (`data.cache_max_gib`) before anything is written."""
    per_prompt = sum(np.asarray(v).nbytes for v in one.values())
    gib = count * per_prompt / 2**30
    log.info("%s: the embedding cache of %d prompts will take %.2f GiB (%d bytes each)", folder, count, gib, per_prompt)
    if max_gib is not None and gib > max_gib:
        raise DataError(
            f"{folder}: the embedding cache of {count} prompts would take {gib:,.1f} GiB ({per_prompt:,} bytes per "
            f"prompt), past data.cache_max_gib={max_gib:g}; raise data.cache_max_gib, or set "
            "data.cache_embeddings=False to encode each batch as it trains"
        )
    return gib


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
        prompts: Sequence[str],
        encode: Callable[[list[str]], dict[str, np.ndarray]],
        *,
        batch_size: int = 64,
        fingerprint: str,
        is_writer: bool = True,
        timeout_s: float = 24 * 3600.0,
        poll_s: float = 10.0,
        max_gib: float | None = None,
    ) -> EmbeddingCache:
        """Open the cache in `folder` if it is complete for (`fingerprint`, `len(prompts)`), else build it.

        With `max_gib`, before a build every process encodes one prompt, logs the cache's size and refuses one
        past `max_gib` GiB (`check_cache_size`), so the waiting processes fail as fast as the writer.

        `encode(prompts)` returns arrays with one leading row per prompt. `fingerprint` should identify
        everything the embeddings depend on (prompt file, encoders, max sequence length, dtype). In multi-host

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
        if max_gib is not None and not _matches(meta, fingerprint, count):  # to be built: how big, refused past it
            check_cache_size(folder, count, encode(list(prompts[:1])), max_gib)
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
        prompts: Sequence[str],
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
                    batch = list(prompts[start : start + batch_size])
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
