"""transformers `T5EncoderModel` <-> flowsteer_jax `T5Encoder`: the key table, built from config.json.

The token embedding is one tensor reachable under two names, `shared.weight` and `encoder.embed_tokens.weight`.
transformers' `save_pretrained` writes only `shared.weight` (as do SD3's `text_encoder_3/` shards); other
exporters write the other name or both. `param_table(config, keys)` maps whichever names the checkpoint has onto
the one Flax `shared.embedding`, and `check_tied_embeddings` refuses a file whose two copies differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from safetensors import safe_open

from conversion.clip import read_json
from conversion.safetensors_io import Checkpoint, ConversionError
from conversion.table import Entry

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu")

# T5Config defaults (transformers 5.x).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def activation_of(feed_forward_proj: str) -> tuple[str, bool]:
    """`feed_forward_proj` -> (activation name, gated), as `T5Config` derives `dense_act_fn`/`is_gated_act`."""
    parts = feed_forward_proj.split("-")
    gated = parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ConversionError(f"feed_forward_proj={feed_forward_proj!r} is not `{{ACT}}` or `gated-{{ACT}}`")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]  # transformers' legacy special case
    return act, gated


def normalize_config(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """transformers T5 config dict -> the fields above; rejects what an encoder-only T5 cannot run."""
    if raw.get("model_type", "t5") != "t5":
        raise ConversionError(f"{source}: model_type={raw['model_type']!r}, expected 't5'")
    archs = raw.get("architectures") or ["T5EncoderModel"]
    if archs != ["T5EncoderModel"]:
        raise ConversionError(f"{source}: architectures={archs}, expected ['T5EncoderModel'] (encoder weights only)")
    cfg = {k: raw.get(k, v) for k, v in DEFAULTS.items()}
    cfg = {k: (None if v is None else type(DEFAULTS[k])(v)) for k, v in cfg.items()}
    try:
        act, _ = activation_of(cfg["feed_forward_proj"])
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    if act not in ACTIVATIONS:
        raise ConversionError(f"{source}: activation {act!r} of feed_forward_proj is not supported ({ACTIVATIONS})")
    return cfg


def read_config(folder: str) -> tuple[dict[str, Any], str]:
    raw, path = read_json(folder, "T5 encoder")
    return normalize_config(raw, path), path


def param_table(config: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[Entry]:
    """Every tensor of the transformers state dict for this config, with its Flax path, shape and layout.

    `keys` (the checkpoint's keys) picks which name(s) of the tied token embedding are expected; without it,
    the table is what transformers' `save_pretrained` writes (`shared.weight` only).
    """
    c = normalize_config(config)
    _, gated = activation_of(c["feed_forward_proj"])
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    present = [k for k in EMBED_KEYS if keys is not None and k in set(keys)] or [EMBED_KEYS[0]]
    table = [Entry(k, ("shared", "embedding"), (c["vocab_size"], d)) for k in present]

    def add(key: str, leaf: str, shape: tuple[int, ...], kind: str = "same") -> None:
        path = tuple(int(s) if s.isdigit() else s for s in key.split("."))
        table.append(Entry(f"{key}.weight", (*path, leaf), shape, kind))

    for i in range(c["num_layers"]):
        attn = f"encoder.block.{i}.layer.0"
        for proj in ("q", "k", "v"):
            add(f"{attn}.SelfAttention.{proj}", "kernel", (inner, d), "linear")
        add(f"{attn}.SelfAttention.o", "kernel", (d, inner), "linear")
        if i == 0:
            shape = (c["relative_attention_num_buckets"], c["num_heads"])
            add(f"{attn}.SelfAttention.relative_attention_bias", "embedding", shape)
        add(f"{attn}.layer_norm", "scale", (d,))
        mlp = f"encoder.block.{i}.layer.1"
        for wi in ("wi_0", "wi_1") if gated else ("wi",):
            add(f"{mlp}.DenseReluDense.{wi}", "kernel", (ff, d), "linear")
        add(f"{mlp}.DenseReluDense.wo", "kernel", (d, ff), "linear")
        add(f"{mlp}.layer_norm", "scale", (d,))
    add("encoder.final_layer_norm", "scale", (d,))
    return table


def check_tied_embeddings(ckpt: Checkpoint, rows_per_chunk: int = 1024) -> None:
    """Raise if a checkpoint holds both embedding names with different values (compared a slice at a time)."""
    if not all(k in ckpt.files for k in EMBED_KEYS):
        return
    shapes = {k: ckpt.shape(k) for k in EMBED_KEYS}
    if len(set(shapes.values())) == 1:
        a, b = (safe_open(ckpt.files[k], framework="np").get_slice(k) for k in EMBED_KEYS)
        n = shapes[EMBED_KEYS[0]][0]
        chunks = [(i, min(i + rows_per_chunk, n)) for i in range(0, n, rows_per_chunk)]
        if all(np.array_equal(a[i:j], b[i:j]) for i, j in chunks):
            return
    raise ConversionError(
        f"{ckpt.folder}: {EMBED_KEYS[0]!r} ({ckpt.files[EMBED_KEYS[0]]}) and {EMBED_KEYS[1]!r} "
        f"({ckpt.files[EMBED_KEYS[1]]}) are the same tied embedding in T5 but differ in this checkpoint"
    )


def to_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json that transformers' `from_pretrained` reads back into the same `T5EncoderModel`."""
    c = normalize_config(config)
    act, gated = activation_of(c["feed_forward_proj"])
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        **c,
        "dense_act_fn": act,
        "is_gated_act": gated,
        "is_encoder_decoder": False,
        "use_cache": False,
    }
