"""transformers `CLIPModel` (text tower + vision tower + projections + `logit_scale`) <-> flowsteer_jax `CLIPModel`.

The vision config schema (`DEFAULTS`, `normalize_config` for `CLIPVisionConfig`), the full-model schema
(`normalize_model_config` for `CLIPConfig`: `text_config`, `vision_config`, `projection_dim`) and the key table.
The text tower's entries come from `conversion.clip.param_table` with the `text_model.` prefix, so the two CLIP
text tables cannot drift. Flax paths equal the torch keys with the leaf renamed, as everywhere (design.md).

Only the open-source transformers layout is handled here; open_clip's layout (`visual.conv1`, `transformer.resblocks`)
is a different table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion import clip as clip_text
from conversion.safetensors_io import ConversionError
from conversion.table import Entry

ARCHITECTURE = "CLIPModel"

# CLIPVisionConfig defaults (transformers 5.x).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# CLIPConfig's own fields (transformers 5.x); `projection_dim` here sizes both projections, as `CLIPModel` builds them.
MODEL_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


def normalize_config(raw: Mapping[str, Any], source: str = "vision config") -> dict[str, Any]:
    """transformers CLIP vision config dict -> the fields of `DEFAULTS`; rejects what the model cannot run."""
    if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{source}: model_type={raw['model_type']!r}, expected 'clip_vision_model'")
    cfg = {k: type(v)(raw.get(k, v)) for k, v in DEFAULTS.items()}
    if cfg["hidden_act"] not in clip_text.ACTIVATIONS:
        raise ConversionError(
            f"{source}: hidden_act={cfg['hidden_act']!r} is not supported ({list(clip_text.ACTIVATIONS)})"
        )
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConversionError(
            f"{source}: hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads="
            f"{cfg['num_attention_heads']}"
        )
    if cfg["image_size"] % cfg["patch_size"]:
        raise ConversionError(
            f"{source}: image_size={cfg['image_size']} is not divisible by patch_size={cfg['patch_size']}"
        )
    return cfg


def num_positions(vision: Mapping[str, Any]) -> int:
    """Patches plus the class token."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def normalize_model_config(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """A transformers `CLIPConfig` dict -> `{"text": ..., "vision": ..., "projection_dim", "logit_scale_init_value"}`.

    `text` is `conversion.clip`'s schema for a `CLIPTextModelWithProjection`, `vision` this module's; both carry the
    top-level `projection_dim`, which is what `CLIPModel` sizes `text_projection` and `visual_projection` with (the
    towers' own `projection_dim` fields are unused there).
    """
    if raw.get("model_type", "clip") != "clip":
        raise ConversionError(f"{source}: model_type={raw['model_type']!r}, expected 'clip'")
    archs = raw.get("architectures") or [ARCHITECTURE]
    if list(archs) != [ARCHITECTURE]:
        raise ConversionError(f"{source}: architectures={archs}, expected [{ARCHITECTURE!r}]")
    out = {k: type(v)(raw.get(k, v)) for k, v in MODEL_DEFAULTS.items()}
    proj = out["projection_dim"]
    text_raw = dict(raw.get("text_config") or {})
    text_raw.update(architectures=[clip_text.ARCHITECTURES[0]], projection_dim=proj)
    text_raw.pop("architecture", None)
    out["text"] = clip_text.normalize_config(text_raw, f"{source} text_config")
    out["vision"] = normalize_config(
        {**(raw.get("vision_config") or {}), "projection_dim": proj}, f"{source} vision_config"
    )
    return out


def read_config(folder: str) -> tuple[dict[str, Any], str]:
    """`folder/config.json` normalised, and its path (for error messages)."""
    raw, path = clip_text.read_json(folder, "CLIPModel")
    return normalize_model_config(raw, path), path


def vision_param_table(vision: Mapping[str, Any], prefix: str = "vision_model.") -> list[Entry]:
    """Every tensor of a transformers `CLIPVisionModel` body (without `visual_projection`)."""
    c = normalize_config(vision)
    d, p = c["hidden_size"], c["patch_size"]
    tower = clip_text.Tower(prefix, "vision_model", d)
    tower.add("embeddings.class_embedding", None, (d,))
    tower.add("embeddings.patch_embedding", "kernel", (d, c["num_channels"], p, p), "conv")
    tower.add("embeddings.position_embedding", "embedding", (num_positions(c), d))
    tower.norm("pre_layrnorm")  # sic: transformers' spelling
    tower.encoder(c["num_hidden_layers"], c["intermediate_size"])
    tower.norm("post_layernorm")
    return tower.table


def param_table(config: Mapping[str, Any]) -> list[Entry]:
    """Every tensor of a transformers `CLIPModel` state dict, from a raw or normalised `CLIPConfig` dict."""
    c = config if "vision" in config and "text" in config else normalize_model_config(config)
    table = clip_text.param_table(c["text"], prefix="text_model.")  # includes text_projection.weight
    table += vision_param_table(c["vision"])
    table.append(
        Entry(
            "visual_projection.weight",
            ("visual_projection", "kernel"),
            (c["projection_dim"], c["vision"]["hidden_size"]),
            "linear",
        )
    )
    table.append(Entry("logit_scale", ("logit_scale",), ()))
    return table
