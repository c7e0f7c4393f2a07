"""diffusers `AutoencoderKL` <-> flowsteer_jax `AutoencoderKL`: the key table, built from config.json.

Flax paths mirror diffusers' module names (`encoder.down_blocks.0.resnets.0.conv1`,
`decoder.mid_block.attentions.0.to_q`); GroupNorm `weight` becomes `scale`, conv/linear `weight` `kernel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.clip import read_json
from conversion.safetensors_io import ConversionError
from conversion.table import Entry

# AutoencoderKL.__init__ defaults (diffusers 0.42): config.json may omit any of these.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def normalize_config(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """diffusers config dict -> complete dict of the fields above; rejects what the model cannot build."""
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ConversionError(f"{source}: unknown AutoencoderKL config key(s) {unknown}")
    cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        cfg[key] = tuple(cfg[key])
    for key in ("latents_mean", "latents_std"):
        cfg[key] = None if cfg[key] is None else tuple(float(v) for v in cfg[key])
    n = len(cfg["block_out_channels"])
    if cfg["down_block_types"] != ("DownEncoderBlock2D",) * n or cfg["up_block_types"] != ("UpDecoderBlock2D",) * n:
        raise ConversionError(
            f"{source}: only {n} x DownEncoderBlock2D / UpDecoderBlock2D (one per block_out_channels entry) are "
            f"supported, got {list(cfg['down_block_types'])} / {list(cfg['up_block_types'])}"
        )
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ConversionError(f"{source}: act_fn={cfg['act_fn']!r} is not supported ('silu')")
    bad = [c for c in cfg["block_out_channels"] if c % cfg["norm_num_groups"]]
    if bad:
        raise ConversionError(f"{source}: block_out_channels {bad} not divisible by norm_num_groups")
    return cfg


def read_config(folder: str) -> tuple[dict[str, Any], str]:
    raw, path = read_json(folder, "VAE")
    return normalize_config(raw, path), path


def param_table(config: Mapping[str, Any]) -> list[Entry]:
    """Every tensor of the diffusers state dict for this config, with its Flax path, shape and layout."""
    c = normalize_config(config)
    chans, latent = c["block_out_channels"], c["latent_channels"]
    table: list[Entry] = []

    def path(key: str) -> tuple[str | int, ...]:
        return tuple(int(s) if s.isdigit() else s for s in key.split("."))

    def conv(key: str, n_in: int, n_out: int, k: int = 3) -> None:
        table.append(Entry(f"{key}.weight", (*path(key), "kernel"), (n_out, n_in, k, k), "conv"))
        table.append(Entry(f"{key}.bias", (*path(key), "bias"), (n_out,)))

    def linear(key: str, n: int) -> None:
        table.append(Entry(f"{key}.weight", (*path(key), "kernel"), (n, n), "linear"))
        table.append(Entry(f"{key}.bias", (*path(key), "bias"), (n,)))

    def norm(key: str, n: int) -> None:
        table.append(Entry(f"{key}.weight", (*path(key), "scale"), (n,)))
        table.append(Entry(f"{key}.bias", (*path(key), "bias"), (n,)))

    def resnet(key: str, n_in: int, n_out: int) -> None:
        norm(f"{key}.norm1", n_in)
        conv(f"{key}.conv1", n_in, n_out)
        norm(f"{key}.norm2", n_out)
        conv(f"{key}.conv2", n_out, n_out)
        if n_in != n_out:
            conv(f"{key}.conv_shortcut", n_in, n_out, 1)

    def mid_block(key: str, n: int) -> None:
        resnet(f"{key}.resnets.0", n, n)
        if c["mid_block_add_attention"]:
            norm(f"{key}.attentions.0.group_norm", n)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                linear(f"{key}.attentions.0.{proj}", n)
        resnet(f"{key}.resnets.1", n, n)

    conv("encoder.conv_in", c["in_channels"], chans[0])
    n_out = chans[0]
    for i, n in enumerate(chans):
        n_in, n_out = n_out, n
        for j in range(c["layers_per_block"]):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", n_in if j == 0 else n_out, n_out)
        if i < len(chans) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", n_out, n_out)
    mid_block("encoder.mid_block", chans[-1])
    norm("encoder.conv_norm_out", chans[-1])
    conv("encoder.conv_out", chans[-1], 2 * latent)

    conv("decoder.conv_in", latent, chans[-1])
    mid_block("decoder.mid_block", chans[-1])
    rev = chans[::-1]
    n_out = rev[0]
    for i, n in enumerate(rev):
        n_in, n_out = n_out, n
        for j in range(c["layers_per_block"] + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", n_in if j == 0 else n_out, n_out)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", n_out, n_out)
    norm("decoder.conv_norm_out", chans[0])
    conv("decoder.conv_out", chans[0], c["out_channels"])

    if c["use_quant_conv"]:
        conv("quant_conv", 2 * latent, 2 * latent, 1)
    if c["use_post_quant_conv"]:
        conv("post_quant_conv", latent, latent, 1)
    return table


def to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json that diffusers' `AutoencoderKL.from_pretrained` reads back into the same model."""
    c = normalize_config(config)
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}
    return {"_class_name": "AutoencoderKL", **out}
