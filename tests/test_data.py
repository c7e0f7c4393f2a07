"""Prompt files (formats and every error), the deterministic sharded loader, and the embedding cache."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowsteer_jax.data import DataError, EmbeddingCache, PromptLoader, load_prompts, open_prompts

# ---------------------------------------------------------------------------------------------------------------
# load_prompts


def test_txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat  \n\n  \n  indented dog\r\nüñí\tcode\n last".encode())
    assert load_prompts(str(path)) == ["a cat", "  indented dog", "üñí\tcode", " last"]


def test_txt_skips_comment_lines(tmp_path):
    """The rule of every program (the trainer's `data.prompts`, `sample --prompts`): `#` lines are comments."""
    path = tmp_path / "p.txt"
    path.write_text("# header\na cat\n  # indented comment\na #hashtag dog\n")
    assert load_prompts(str(path)) == ["a cat", "a #hashtag dog"]
    path.write_text("# only\n\n# comments\n")
    _raises(path, "no prompts")


def test_txt_bom_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    assert load_prompts(str(path)) == ["hello", "world"]


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "a cat", "id": 1}), "", json.dumps({"prompt": 'ünï "q"'}), "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["a cat", 'ünï "q"']


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [3, 4, 5], "prompt": ["a", "b ü", "c"]}), path)
    assert load_prompts(str(path)) == ["a", "b ü", "c"]


def test_parquet_dictionary_encoded(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": pa.array(["x", "y", "x"]).dictionary_encode()}), path)
    assert load_prompts(str(path)) == ["x", "y", "x"]


def _raises(path, *fragments):
    with pytest.raises(DataError) as info:
        load_prompts(str(path))
    message = str(info.value)
    for fragment in (path.name, *fragments):
        assert fragment in message, (fragment, message)
    return message


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one\ntwo\nth\xffree\nfour\n")
    _raises(path, "line 3", "UTF-8")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xc3"}\n')
    _raises(jsonl, "line 3", "UTF-8")


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",}\n{"prompt": "c"}\n')
    _raises(path, "line 2", "JSON")


def test_missing_or_non_string_prompt_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    _raises(path, "line 3", "prompt")
    path.write_text('{"prompt": "a"}\n{"prompt": 7}\n')
    _raises(path, "line 2", "prompt", "int")
    path.write_text('["a"]\n')
    _raises(path, "line 1", "object")


@pytest.mark.parametrize("name,content", [("e.txt", b"\n  \n\n"), ("e.jsonl", b""), ("e.txt", b"")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    _raises(path, "no prompts")


def test_empty_parquet(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    _raises(path, "no prompts")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.txt", "no such file")


def test_unknown_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("a\n")
    _raises(path, ".csv")


def test_unreadable(tmp_path):
    (tmp_path / "dir.txt").mkdir()  # a folder is read as a folder of prompt files
    _raises(tmp_path / "dir.txt", "the folder holds no .txt/.jsonl/.parquet files")
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not parquet at all")
    _raises(path, "parquet")


def test_parquet_without_prompt_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    _raises(path, "'prompt'", "text")


def test_parquet_null_or_non_string_names_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", None, "d"]}), path)
    _raises(path, "row 2", "null")
    pq.write_table(pa.table({"prompt": [1, 2]}), path)
    _raises(path, "row 0", "int")


# ---------------------------------------------------------------------------------------------------------------
# PromptLoader


def _take(loader, n):
    return [loader.next() for _ in range(n)]


def test_loader_is_deterministic_per_seed():
    a = np.concatenate(_take(PromptLoader(100, 8, seed=3), 30))
    b = np.concatenate(_take(PromptLoader(100, 8, seed=3), 30))
    c = np.concatenate(_take(PromptLoader(100, 8, seed=4), 30))
    assert a.dtype == np.int64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_loader_stream_is_the_spec():
    n, b = 7, 3
    stream = np.concatenate([np.random.default_rng([11, e]).permutation(n) for e in range(6)])
    got = np.concatenate(_take(PromptLoader(n, b, seed=11), 14))
    assert np.array_equal(got, stream[: 14 * b])


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n = 50
    stream = np.concatenate(_take(PromptLoader(n, 10, seed=0), 20))  # 4 epochs
    epochs = stream.reshape(4, n)
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))


def test_batches_cross_epoch_boundaries():
    loader = PromptLoader(5, 4, seed=1)
    p = [np.random.default_rng([1, e]).permutation(5) for e in range(4)]
    assert loader.epoch == 0
    assert np.array_equal(loader.next(), p[0][:4])
    assert loader.epoch == 0  # item 4 of epoch 0 still to come
    assert np.array_equal(loader.next(), np.concatenate([p[0][4:], p[1][:3]]))
    assert loader.epoch == 1
    assert np.array_equal(loader.next(), np.concatenate([p[1][3:], p[2][:2]]))
    assert loader.epoch == 2


def test_batch_larger_than_dataset():
    got = PromptLoader(2, 5, seed=0, shuffle=False).next()
    assert np.array_equal(got, [0, 1, 0, 1, 0])


def test_no_shuffle_is_arange():
    loader = PromptLoader(5, 3, seed=9, shuffle=False)
    assert np.array_equal(np.concatenate(_take(loader, 4)), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])


def test_resume_from_state_continues_identically():
    ref = _take(PromptLoader(13, 6, seed=5), 12)
    loader = PromptLoader(13, 6, seed=5)
    _take(loader, 5)
    state = json.loads(json.dumps(loader.state()))  # it must survive a round trip through a checkpoint
    assert state == {"position": 5, "seed": 5, "num_items": 13, "global_batch": 6}
    resumed = PromptLoader(state["num_items"], state["global_batch"], seed=state["seed"], position=state["position"])
    assert resumed.epoch == loader.epoch == 5 * 6 // 13
    for expected, got in zip(ref[5:], _take(resumed, 7), strict=True):
        assert np.array_equal(expected, got)
    again = PromptLoader.from_state(state)
    assert np.array_equal(next(again), ref[5])


def test_process_slices_concatenate_to_the_global_batch():
    one = PromptLoader(11, 6, seed=2)
    parts = [PromptLoader(11, 6, seed=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(8):
        local = [next(p) for p in parts]
        assert [x.shape for x in local] == [(3,), (3,)]
        assert np.array_equal(np.concatenate(local), one.next())
    # A resume may change the host count: 3 processes from position 8 continue the same stream.
    three = [PromptLoader(11, 6, seed=2, process_index=p, process_count=3, position=8) for p in range(3)]
    assert np.array_equal(np.concatenate([p.next() for p in three]), one.next())


def test_iterator():
    loader = PromptLoader(4, 2, seed=0)
    assert iter(loader) is loader
    got = [b for _, b in zip(range(3), loader, strict=False)]
    assert len(got) == 3 and loader.position == 3


def test_loader_validation():
    with pytest.raises(DataError, match="6.*4"):
        PromptLoader(10, 6, seed=0, process_count=4)
    with pytest.raises(DataError, match="num_items"):
        PromptLoader(0, 4, seed=0)
    with pytest.raises(DataError, match="global_batch"):
        PromptLoader(10, 0, seed=0)
    with pytest.raises(DataError, match="process_index"):
        PromptLoader(10, 4, seed=0, process_index=2, process_count=2)


# ---------------------------------------------------------------------------------------------------------------
# EmbeddingCache


class Encoder:
    """Deterministic fake text encoder that counts its calls."""

    def __init__(self, scale=1.0):
        self.calls = 0
        self.scale = scale

    def __call__(self, prompts):
        self.calls += 1
        codes = np.array([[sum(map(ord, p)), len(p)] for p in prompts], np.float32) * self.scale
        return {
            "prompt_embeds": np.repeat(codes[:, None, :], 3, axis=1).astype(np.float16),  # (B, 3, 2)
            "pooled": codes,  # (B, 2)
        }


PROMPTS = [f"prompt number {i}" for i in range(10)]


def test_cache_builds_once_and_reopens(tmp_path):
    folder = str(tmp_path / "cache")
    enc = Encoder()
    cache = EmbeddingCache.build(folder, PROMPTS, enc, batch_size=4, fingerprint="f1")
    assert enc.calls == 3  # ceil(10 / 4)
    assert len(cache) == 10 and sorted(cache.keys) == ["pooled", "prompt_embeds"]
    full = enc(PROMPTS)
    idx = np.array([7, 0, 9, 3, 3])
    got = cache.get(idx)
    for key in full:
        assert got[key].dtype == full[key].dtype
        assert np.array_equal(got[key], full[key][idx])
    assert not [e for e in os.listdir(tmp_path) if e != "cache"]  # no temporary folder left behind

    enc2 = Encoder()
    reopened = EmbeddingCache.build(folder, PROMPTS, enc2, batch_size=4, fingerprint="f1")
    assert enc2.calls == 0
    assert np.array_equal(reopened.get([1, 2])["prompt_embeds"], full["prompt_embeds"][[1, 2]])
    assert isinstance(reopened._arrays["pooled"], np.memmap)  # read lazily, not loaded


def test_cache_fingerprint_or_count_change_rebuilds(tmp_path, caplog):
    folder = str(tmp_path / "cache")
    EmbeddingCache.build(folder, PROMPTS, Encoder(), fingerprint="f1")
    enc = Encoder(scale=2.0)
    with caplog.at_level(logging.WARNING, logger="flowsteer_jax.data"):
        cache = EmbeddingCache.build(folder, PROMPTS, enc, batch_size=64, fingerprint="f2")
    assert enc.calls == 1
    assert "rebuilding" in caplog.text
    assert cache.fingerprint == "f2"
    assert np.array_equal(cache.get([4])["pooled"], Encoder(2.0)(PROMPTS[4:5])["pooled"])
    enc = Encoder()
    cache = EmbeddingCache.build(folder, PROMPTS[:6], enc, fingerprint="f2")
    assert enc.calls == 1 and len(cache) == 6
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # the stale cache was removed


def test_incomplete_folders_are_not_used(tmp_path):
    folder = tmp_path / "cache"
    EmbeddingCache.build(str(folder), PROMPTS, Encoder(), fingerprint="f1")
    # A crash after the arrays but before meta.json: the folder has data but is not complete.
    os.remove(folder / "meta.json")
    enc = Encoder()
    EmbeddingCache.build(str(folder), PROMPTS, enc, fingerprint="f1")
    assert enc.calls == 1
    # A crashed build's temporary folder, even one holding a meta.json, is never opened; it gets cleaned up.
    leftover = tmp_path / ".other.tmp-host-1-abc"
    EmbeddingCache.build(str(tmp_path / "cache2"), PROMPTS, Encoder(), fingerprint="f1")
    os.rename(tmp_path / "cache2", leftover)
    enc = Encoder()
    EmbeddingCache.build(str(tmp_path / "other"), PROMPTS, enc, fingerprint="f1")
    assert enc.calls == 1
    assert not leftover.exists()
    with pytest.raises(DataError, match="meta.json"):
        EmbeddingCache(str(leftover.parent / "missing"))


def test_failed_build_leaves_nothing(tmp_path):
    def broken(prompts):
        if prompts[0] == PROMPTS[4]:
            raise RuntimeError("encoder crashed")
        return Encoder()(prompts)

    with pytest.raises(RuntimeError):
        EmbeddingCache.build(str(tmp_path / "cache"), PROMPTS, broken, batch_size=4, fingerprint="f1")
    assert os.listdir(tmp_path) == []


def test_inconsistent_encoder_output_errors(tmp_path):
    widths = iter(range(2, 10))

    def ragged(prompts):
        return {"pooled": np.zeros((len(prompts), next(widths)), np.float32)}

    with pytest.raises(DataError, match="pooled"):
        EmbeddingCache.build(str(tmp_path / "cache"), PROMPTS, ragged, batch_size=4, fingerprint="f1")


def test_cached_rows_equal_encoding_in_batches_of_batch_size(tmp_path):
    """Encoders' last bits depend on the batch size (XLA picks other kernels), not on the other rows: the cache
    encodes in batches of `batch_size`, the last one padded, so its rows are what the training loop's batches of
    that size give, bit for bit (`data.cache_embeddings` changes nothing)."""

    def by_batch_size(prompts):  # a row's value depends on its prompt and on the batch size only
        return {"pooled": np.array([[len(p) + len(prompts) / 1000] for p in prompts], np.float32)}

    cache = EmbeddingCache.build(str(tmp_path / "c"), PROMPTS, by_batch_size, batch_size=4, fingerprint="f")
    loop = by_batch_size(PROMPTS[8:] + PROMPTS[:2])["pooled"]  # a loop batch of 4 that wraps around the epoch
    assert np.array_equal(cache.get([8, 9, 0, 1])["pooled"], loop)


def test_bfloat16_round_trip(tmp_path):
    import ml_dtypes

    values = np.arange(20, dtype=np.float32).reshape(10, 2).astype(ml_dtypes.bfloat16)
    cache = EmbeddingCache.build(
        str(tmp_path / "c"),
        PROMPTS,
        lambda p: {"x": values[[PROMPTS.index(q) for q in p]]},
        batch_size=16,
        fingerprint="b",
    )
    got = EmbeddingCache(str(tmp_path / "c")).get([1, 3])["x"]
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, values[[1, 3]])
    assert cache.get([0])["x"].dtype == ml_dtypes.bfloat16


def test_non_writer_waits_for_the_writer(tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    enc = Encoder()
    sleeps = []

    def fake_sleep(seconds):
        # The "writer" finishes while the reader polls for the second time.
        sleeps.append(seconds)
        if len(sleeps) == 2:
            EmbeddingCache.build(folder, PROMPTS, Encoder(), fingerprint="f1")

    monkeypatch.setattr("flowsteer_jax.data.time.sleep", fake_sleep)
    cache = EmbeddingCache.build(folder, PROMPTS, enc, fingerprint="f1", is_writer=False, poll_s=0.5)
    assert enc.calls == 0 and sleeps == [0.5, 0.5] and len(cache) == 10
    with pytest.raises(DataError, match="waiting"):
        EmbeddingCache.build(folder, PROMPTS, enc, fingerprint="f2", is_writer=False, timeout_s=0.0, poll_s=0.0)
    assert enc.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# open_prompts: globs, folders, datasets folders, streaming


def _shards(folder, column="caption", sizes=(5, 3, 4), row_group_size=None):
    """Parquet shards `part-<i>.parquet` with prompts `s<i>-<row>` in `column`, plus an `id` column."""
    folder.mkdir(exist_ok=True)
    expected = []
    for i, n in enumerate(sizes):
        prompts = [f"s{i}-{r}" for r in range(n)]
        expected += prompts
        table = pa.table({"id": list(range(n)), column: prompts})
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=row_group_size)
    return expected


def test_glob_and_folder_of_parquet_shards_with_a_custom_column(tmp_path):
    expected = _shards(tmp_path / "shards")
    (tmp_path / "shards" / "README.md").write_text("not a prompt file")
    by_glob = open_prompts(str(tmp_path / "shards" / "part-*.parquet"), "caption")
    by_folder = open_prompts(str(tmp_path / "shards"), "caption")
    assert list(by_glob) == list(by_folder) == expected and len(by_glob) == 12
    assert by_glob.take([11, 0, 5, 7]) == ["s2-3", "s0-0", "s1-0", "s1-2"] and by_glob[-1] == "s2-3"
    assert by_glob[4:7] == ["s0-4", "s1-0", "s1-1"]
    with pytest.raises(DataError, match="part-0.parquet: no 'prompt' column.*caption"):
        open_prompts(str(tmp_path / "shards"))
    with pytest.raises(DataError, match="the glob matches no"):
        open_prompts(str(tmp_path / "shards" / "*.jsonl"))
    jsonl = tmp_path / "mixed"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text('{"caption": "x"}\n{"caption": "y"}\n')
    (jsonl / "b.txt").write_text("z\n")
    assert list(open_prompts(str(jsonl), "caption")) == ["x", "y", "z"]


def test_a_datasets_save_to_disk_folder(tmp_path):
    """The layout `datasets.Dataset.save_to_disk` writes: arrow *stream* files listed in state.json."""
    folder = tmp_path / "ds"
    folder.mkdir()
    names = []
    for i, rows in enumerate((["a", "b"], ["c"])):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.table({"text": rows, "n": list(range(len(rows)))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "abc", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    prompts = open_prompts(str(folder), "text")
    assert list(prompts) == ["a", "b", "c"] and prompts.take([2, 0]) == ["c", "a"]
    with pytest.raises(DataError, match="no 'prompt' column"):
        open_prompts(str(folder))


def test_prompts_are_streamed_never_read_whole(tmp_path, monkeypatch):
    """Opening reads the footers only; a batch reads its own row groups, not the shards."""
    expected = _shards(tmp_path / "shards", sizes=(1000, 1000), row_group_size=10)
    reads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        reads.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a whole table was read"))
    prompts = open_prompts(str(tmp_path / "shards" / "*.parquet"), "caption")
    assert len(prompts) == 2000 and reads == []
    idx = PromptLoader(len(prompts), 8, seed=0).next()
    assert prompts.take(idx) == [expected[i] for i in idx]
    assert 1 <= len(reads) <= 8  # one row group (10 rows) per prompt at most, out of 200


def test_text_files_keep_offsets_not_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"t": f"prompt {i}", "i": i}) + "\n" for i in range(5000)))
    prompts = open_prompts(str(path), "t")
    assert len(prompts) == 5000 and prompts.take([4999, 17]) == ["prompt 4999", "prompt 17"]
    (shard,) = prompts.shards
    assert not any(isinstance(v, list) for v in vars(shard).values())  # the index is an offsets array
    assert shard.offsets.dtype == np.int64 and shard.offsets.shape == (5000,)


def test_cache_states_its_size_and_refuses_past_the_limit(tmp_path, caplog):
    prompts = [f"p{i}" for i in range(1000)]
    folder = tmp_path / "emb"
    with caplog.at_level(logging.INFO, logger="flowsteer_jax.data"):
        with pytest.raises(DataError) as info:
            EmbeddingCache.build(str(folder), prompts, Encoder(), fingerprint="f", max_gib=1e-6)
    message = str(info.value)  # 20 bytes per prompt (Encoder's outputs): 1.9e-5 GiB
    assert (
        "data.cache_max_gib=1e-06" in message
        and "20 bytes per prompt" in message
        and "1000 prompts" in message
        and "GiB" in message
    )
    assert not folder.exists() and not list(tmp_path.iterdir())  # nothing written
    assert any("will take" in r.getMessage() and "GiB" in r.getMessage() for r in caplog.records)
    cache = EmbeddingCache.build(str(folder), prompts, Encoder(), fingerprint="f", max_gib=1e-4)
    assert len(cache) == 1000
