"""transformers `CLIPTextModel` / `CLIPTextModelWithProjection` <-> flowsteer_jax `CLIPText`: the key table.

Flax paths always read `text_model.*` (+ `text_projection`), as in `CLIPTextModelWithProjection`. transformers
5.x saves a bare `CLIPTextModel` without that prefix while 4.x checkpoints (e.g. SD1.x `text_encoder/`) keep it,
so the torch-side prefix is a parameter chosen from the checkpoint's keys.

Unlike diffusers configs, a transformers config.json carries many generic `PretrainedConfig` fields that change
between versions; only the fields below are read, and the ones the model cannot honour are rejected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from conversion.safetensors_io import ConversionError
from conversion.safetensors_io import read_json as read_json_file
from conversion.table import Entry

ARCHITECTURES = ("CLIPTextModelWithProjection", "CLIPTextModel")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

# CLIPTextConfig defaults (transformers 5.x).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


def normalize_config(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """transformers CLIP text config dict -> the fields above plus `architecture`; rejects what we cannot run."""
    if raw.get("model_type", "clip_text_model") != "clip_text_model":
        raise ConversionError(f"{source}: model_type={raw['model_type']!r}, expected 'clip_text_model'")
    cfg = {k: raw.get(k, v) for k, v in DEFAULTS.items()}
    cfg = {k: (None if v is None else type(DEFAULTS[k])(v)) for k, v in cfg.items()}
    archs = raw.get("architectures") or [raw.get("architecture", ARCHITECTURES[0])]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(f"{source}: architectures={archs} is not one of {list(ARCHITECTURES)}")
    cfg["architecture"] = archs[0]
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ConversionError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported ({list(ACTIVATIONS)})")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConversionError(
            f"{source}: hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads="
            f"{cfg['num_attention_heads']}"
        )
    if cfg["eos_token_id"] is None:
        raise ConversionError(f"{source}: eos_token_id must be set (the pooled output is taken at the EOS token)")
    return cfg


def read_json(folder: str, what: str) -> tuple[dict[str, Any], str]:
    """`folder/config.json` as a dict, or a ConversionError naming the file."""
    path = os.path.join(folder, "config.json")
    return read_json_file(path, f"{what} config"), path


def read_config(folder: str) -> tuple[dict[str, Any], str]:
    raw, path = read_json(folder, "CLIP text encoder")
    return normalize_config(raw, path), path


def torch_prefix(config: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """`text_model.` for the projection model and for 4.x-style checkpoints, `` for a 5.x `CLIPTextModel`."""
    if normalize_config(config)["architecture"] == "CLIPTextModelWithProjection":
        return "text_model."
    return "text_model." if keys is not None and any(k.startswith("text_model.") for k in keys) else ""


class Tower:
    """A CLIP tower's key table under construction: torch keys `{prefix}{key}.weight|bias` at Flax paths
    `(root, *key, leaf)`. The text and vision towers (`conversion/clip_model.py`) share it and their encoder."""

    def __init__(self, prefix: str, root: str, width: int):
        self.prefix, self.root, self.width = prefix, root, width
        self.table: list[Entry] = []

    def add(self, key: str, leaf: str | None, shape: tuple[int, ...], kind: str = "same") -> None:
        """One tensor; `leaf=None`: a bare parameter (torch key without `.weight`, Flax path without a leaf)."""
        parts = tuple(int(s) if s.isdigit() else s for s in key.split("."))
        suffix = "" if leaf is None else (".bias" if leaf == "bias" else ".weight")
        path = (self.root, *parts) + (() if leaf is None else (leaf,))
        self.table.append(Entry(f"{self.prefix}{key}{suffix}", path, shape, kind))

    def linear(self, key: str, n_in: int, n_out: int) -> None:
        self.add(key, "kernel", (n_out, n_in), "linear")
        self.add(key, "bias", (n_out,))

    def norm(self, key: str) -> None:
        self.add(key, "scale", (self.width,))
        self.add(key, "bias", (self.width,))

    def encoder(self, num_layers: int, intermediate_size: int) -> None:
        """`encoder.layers.*`: attention projections, two LayerNorms and the MLP of every layer."""
        d = self.width
        for i in range(num_layers):
            layer = f"encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                self.linear(f"{layer}.self_attn.{proj}", d, d)
            self.norm(f"{layer}.layer_norm1")
            self.linear(f"{layer}.mlp.fc1", d, intermediate_size)
            self.linear(f"{layer}.mlp.fc2", intermediate_size, d)
            self.norm(f"{layer}.layer_norm2")


def param_table(config: Mapping[str, Any], prefix: str | None = None) -> list[Entry]:
    """Every tensor of the transformers state dict for this config, with its Flax path, shape and layout."""
    c = normalize_config(config)
    d = c["hidden_size"]
    tower = Tower(torch_prefix(c) if prefix is None else prefix, "text_model", d)
    tower.add("embeddings.token_embedding", "embedding", (c["vocab_size"], d))
    tower.add("embeddings.position_embedding", "embedding", (c["max_position_embeddings"], d))
    tower.encoder(c["num_hidden_layers"], c["intermediate_size"])
    tower.norm("final_layer_norm")
    table = tower.table
    if c["architecture"] == "CLIPTextModelWithProjection":
        table.append(Entry("text_projection.weight", ("text_projection", "kernel"), (c["projection_dim"], d), "linear"))
    return table


def to_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json that transformers' `from_pretrained` reads back into the same model."""
    c = normalize_config(config)
    out = {k: c[k] for k in DEFAULTS}
    return {"architectures": [c["architecture"]], "model_type": "clip_text_model", **out}
