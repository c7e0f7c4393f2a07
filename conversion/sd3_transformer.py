"""diffusers `SD3Transformer2DModel` <-> flowsteer_jax `MMDiT`: the key table, built from config.json.

Flax paths mirror diffusers' module names; only the leaf differs (`weight` -> `kernel` for Linear/Conv,
`weight` -> `scale` for RMSNorm) together with the layout change recorded in the entry's kind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from conversion.errors import shorten
from conversion.safetensors_io import ConversionError, read_json
from conversion.table import Entry

# SD3Transformer2DModel.__init__ defaults (diffusers 0.42): config.json may omit any of these.
DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}


def normalize_config(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """diffusers config dict -> complete dict of the fields above; rejects what the model cannot build."""
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ConversionError(f"{source}: unknown SD3Transformer2DModel config key(s) {unknown}")
    cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    # A wrong-typed field ("num_layers": "24") would otherwise fail deep inside the model build, naming nothing.
    sizes = [k for k, v in DEFAULTS.items() if isinstance(v, int)]
    bad = [f"{k}={shorten(repr(cfg[k]))}" for k in sizes if not (type(cfg[k]) is int and cfg[k] >= 1)]
    layers = cfg["dual_attention_layers"] or ()
    if not isinstance(layers, list | tuple) or not all(type(i) is int and i >= 0 for i in layers):
        bad.append(f"dual_attention_layers={shorten(repr(layers))}")
    if bad:
        raise ConversionError(
            f"{source}: {', '.join(bad)}: sizes must be positive integers, dual_attention_layers a list of indices"
        )
    cfg["dual_attention_layers"] = tuple(layers)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != inner:
        raise ConversionError(
            f"{source}: caption_projection_dim={cfg['caption_projection_dim']} must equal "
            f"num_attention_heads * attention_head_dim = {inner} (the joint blocks share one width)"
        )
    if cfg["qk_norm"] not in (None, "rms_norm"):
        raise ConversionError(f"{source}: qk_norm={cfg['qk_norm']!r} is not supported (None or 'rms_norm')")
    return cfg


def read_config(folder: str) -> tuple[dict[str, Any], str]:
    path = os.path.join(folder, "config.json")
    return normalize_config(read_json(path, "transformer config"), path), path


def param_table(config: Mapping[str, Any]) -> list[Entry]:
    """Every tensor of the diffusers state dict for this config, with its Flax path, shape and layout."""
    c = normalize_config(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    hd = c["attention_head_dim"]
    p = c["patch_size"]
    table: list[Entry] = []

    def linear(key: str, n_in: int, n_out: int) -> None:
        path = tuple(int(s) if s.isdigit() else s for s in key.split("."))
        table.append(Entry(f"{key}.weight", (*path, "kernel"), (n_out, n_in), "linear"))
        table.append(Entry(f"{key}.bias", (*path, "bias"), (n_out,)))

    def rms(key: str) -> None:
        path = tuple(int(s) if s.isdigit() else s for s in key.split("."))
        table.append(Entry(f"{key}.weight", (*path, "scale"), (hd,)))

    g = c["pos_embed_max_size"]
    table.append(Entry("pos_embed.pos_embed", ("pos_embed", "pos_embed"), (1, g * g, d)))
    table.append(Entry("pos_embed.proj.weight", ("pos_embed", "proj", "kernel"), (d, c["in_channels"], p, p), "conv"))
    table.append(Entry("pos_embed.proj.bias", ("pos_embed", "proj", "bias"), (d,)))
    linear("time_text_embed.timestep_embedder.linear_1", 256, d)
    linear("time_text_embed.timestep_embedder.linear_2", d, d)
    linear("time_text_embed.text_embedder.linear_1", c["pooled_projection_dim"], d)
    linear("time_text_embed.text_embedder.linear_2", d, d)
    linear("context_embedder", c["joint_attention_dim"], d)

    for i in range(c["num_layers"]):
        b = f"transformer_blocks.{i}"
        last = i == c["num_layers"] - 1
        dual = i in c["dual_attention_layers"]
        linear(f"{b}.norm1.linear", d, (9 if dual else 6) * d)
        linear(f"{b}.norm1_context.linear", d, (2 if last else 6) * d)
        for attn, joint in [("attn", True)] + ([("attn2", False)] if dual else []):
            for proj in ("to_q", "to_k", "to_v"):
                linear(f"{b}.{attn}.{proj}", d, d)
            linear(f"{b}.{attn}.to_out.0", d, d)
            if joint:
                for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
                    linear(f"{b}.{attn}.{proj}", d, d)
                if not last:
                    linear(f"{b}.{attn}.to_add_out", d, d)
            if c["qk_norm"]:
                for norm in ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if joint else ()):
                    rms(f"{b}.{attn}.{norm}")
        for ff in ("ff",) + (() if last else ("ff_context",)):
            linear(f"{b}.{ff}.net.0.proj", d, 4 * d)
            linear(f"{b}.{ff}.net.2", 4 * d, d)

    linear("norm_out.linear", d, 2 * d)
    linear("proj_out", d, p * p * c["out_channels"])
    return table


def linear_modules(config: Mapping[str, Any]) -> list[str]:
    """The dotted path of every Linear layer this config builds, from the key table alone (no model, no weights):
    what LoRA targets are matched against before anything loads."""
    return [".".join(map(str, e.flax_path[:-1])) for e in param_table(config) if e.kind == "linear"]
