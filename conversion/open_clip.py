"""open_clip `CLIP` (model-config JSON + state dict) <-> flowsteer_jax `CLIPModel` (transformers layout).

open_clip's plain ViT CLIP is the same network as transformers' `CLIPModel` under other names: pre-LN residual
blocks (`ln_1`, packed `attn.in_proj_*`, `ln_2`, `mlp.c_fc`/`c_proj`), a bias-free patch conv, a class token,
`ln_pre`/`ln_post`, a causal text tower pooled at the EOT token, projections applied as `x @ P`. So this module
maps open_clip's config onto `conversion.clip_model`'s normalised schema and its state dict onto the same Flax
paths as `conversion.clip_model.param_table`. Everything open_clip can build that this network is not (layer
scale, attentional pooling, timm/HF towers, SigLIP's logit bias, ...) is refused by name.

HPSv2 is open_clip's `ViT-H-14` (`VIT_H_14`, the default when no config file is given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from conversion import clip as clip_text
from conversion import clip_model as clip_model_conv
from conversion.errors import ConversionError
from conversion.safetensors_io import Checkpoint, read_json
from conversion.table import Entry

# open_clip's model_configs/ViT-H-14.json (HPSv2's backbone); `quick_gelu` absent there means nn.GELU.
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# CLIPVisionCfg / CLIPTextCfg fields (open_clip 3.3.0) that shape the network, with their defaults.
VISION_DEFAULTS: dict[str, Any] = {"head_width": 64, "mlp_ratio": 4.0}
VISION_REQUIRED = ("image_size", "layers", "width", "patch_size")
TEXT_DEFAULTS: dict[str, Any] = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
TEXT_DEFAULTS["mlp_ratio"] = 4.0

# Fields whose non-default value builds a network other than this one: each must keep exactly this value.
_ARCH_FIELDS: dict[str, Any] = {
    "ls_init_value": None,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_FIXED: dict[str, Any] = {
    **_ARCH_FIELDS,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "timm_model_name": None,
}
TEXT_FIXED: dict[str, Any] = {
    **_ARCH_FIELDS,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
}
# Fields that change nothing at inference here: training-only (`patch_dropout`), the tokenizer's (the caller
# tokenises), `final_ln_after_pool` (LayerNorm is per token, so before or after taking one token is the same),
# `eos_id`/`pad_id` (argmax pooling reads neither), and settings of towers refused above.
VISION_IGNORED = {
    "patch_dropout",
    "output_tokens",
    "final_ln_after_pool",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
TEXT_IGNORED = {
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "pad_id",
    "eos_id",
    "output_tokens",
    "final_ln_after_pool",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
}
TOP_FIXED: dict[str, Any] = {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False}
TOP_IGNORED = {"init_logit_scale"}  # an initial value only; the checkpoint's `logit_scale` replaces it

# Buffers open_clip rebuilds at construction and saves as non-persistent: never in a 3.x state dict. A file from
# an older open_clip may still carry one; our model builds the same causal mask itself, so it is dropped if its
# shape fits (`without_buffers`) and reported as an unknown key otherwise.
BUFFERS = ("attn_mask",)


def _check_fields(
    raw: Mapping[str, Any], known: set[str], fixed: Mapping[str, Any], ignored: set[str], source: str
) -> list[str]:
    problems = [f"{source}: unknown field {k!r}" for k in raw if k not in known | set(fixed) | ignored]
    problems += [
        f"{source}: {k}={raw[k]!r} is not supported (only {v!r})"
        for k, v in fixed.items()
        if k in raw and raw[k] != v and not (k == "block_type" and raw[k] == "default")
    ]
    return problems


def _int(raw: Mapping[str, Any], key: str, source: str) -> int:
    v = raw[key]
    if isinstance(v, (list, tuple)):  # open_clip allows (h, w) image sizes and ResNet layer tuples
        raise ConversionError(f"{source}: {key}={list(v)} is not supported (a single int only)")
    return int(v)


def normalize_config(raw: Mapping[str, Any] | None = None, source: str = "open_clip config") -> dict[str, Any]:
    """An open_clip model config (its model_configs/*.json format; None: `VIT_H_14`) -> the normalised dict
    `CLIPModelConfig.from_normalized` takes, validated by `conversion.clip`/`conversion.clip_model`'s schemas.

    Text pooling: open_clip pools at the largest token id (`argmax`); the EOT token is the largest id of its
    vocabulary (`vocab_size - 1`), and our text tower pools at the first `eos_token_id`, which is the same
    position for every sequence holding an EOT, as every tokenised prompt does.
    """
    raw = VIT_H_14 if raw is None else raw
    top_known = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    problems = _check_fields(raw, top_known, TOP_FIXED, TOP_IGNORED, source)
    vision = dict(raw.get("vision_cfg") or {})
    text = dict(raw.get("text_cfg") or {})
    problems += _check_fields(
        vision, set(VISION_DEFAULTS) | set(VISION_REQUIRED), VISION_FIXED, VISION_IGNORED, f"{source} vision_cfg"
    )
    problems += _check_fields(text, set(TEXT_DEFAULTS), TEXT_FIXED, TEXT_IGNORED, f"{source} text_cfg")
    if "embed_dim" not in raw:
        problems.append(f"{source}: missing field 'embed_dim'")
    problems += [f"{source} vision_cfg: missing field {k!r}" for k in VISION_REQUIRED if k not in vision]
    if problems:
        raise ConversionError("\n  ".join(problems))
    vision = {**VISION_DEFAULTS, **vision}
    text = {**TEXT_DEFAULTS, **text}
    act = "quick_gelu" if raw.get("quick_gelu", False) else "gelu"  # open_clip: QuickGELU if quick_gelu else nn.GELU
    proj = _int(raw, "embed_dim", source)
    width, head_width = (
        _int(vision, "width", f"{source} vision_cfg"),
        _int(vision, "head_width", f"{source} vision_cfg"),
    )
    if width % head_width:
        raise ConversionError(f"{source} vision_cfg: width={width} is not divisible by head_width={head_width}")
    vocab = _int(text, "vocab_size", f"{source} text_cfg")
    text_width = _int(text, "width", f"{source} text_cfg")
    text_raw = {
        "architectures": [clip_text.ARCHITECTURES[0]],
        "vocab_size": vocab,
        "hidden_size": text_width,
        "intermediate_size": int(text_width * float(text["mlp_ratio"])),  # open_clip's int(width * mlp_ratio)
        "projection_dim": proj,
        "num_hidden_layers": _int(text, "layers", f"{source} text_cfg"),
        "num_attention_heads": _int(text, "heads", f"{source} text_cfg"),
        "max_position_embeddings": _int(text, "context_length", f"{source} text_cfg"),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,  # open_clip's LayerNorm: torch's default eps
        "pad_token_id": 0,  # open_clip pads token rows with 0
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
    }
    vision_raw = {
        "hidden_size": width,
        "intermediate_size": int(width * float(vision["mlp_ratio"])),
        "projection_dim": proj,
        "num_hidden_layers": _int(vision, "layers", f"{source} vision_cfg"),
        "num_attention_heads": width // head_width,
        "num_channels": 3,
        "image_size": _int(vision, "image_size", f"{source} vision_cfg"),
        "patch_size": _int(vision, "patch_size", f"{source} vision_cfg"),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    return {
        "text": clip_text.normalize_config(text_raw, f"{source} text_cfg"),
        "vision": clip_model_conv.normalize_config(vision_raw, f"{source} vision_cfg"),
        "projection_dim": proj,
        "logit_scale_init_value": float(raw.get("init_logit_scale", math.log(1 / 0.07))),
    }


def read_config(path: str) -> dict[str, Any]:
    """An open_clip model-config JSON file, normalised (errors name the file)."""
    raw = read_json(path, "open_clip model config")
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return normalize_config(raw, path)


class _Tower:
    """One open_clip tower's entries: torch keys `{prefix}{key}` at Flax paths `(root, *path)`."""

    def __init__(self, prefix: str, root: str, width: int):
        self.prefix, self.root, self.width = prefix, root, width
        self.table: list[Entry] = []

    def add(self, key: str, path: str, shape: tuple[int, ...], kind: str = "same", part: tuple[int, int] | None = None):
        parts = tuple(int(s) if s.isdigit() else s for s in path.split("."))
        self.table.append(Entry(f"{self.prefix}{key}", (self.root, *parts), shape, kind, part))

    def linear(self, key: str, path: str, n_in: int, n_out: int) -> None:
        self.add(f"{key}.weight", f"{path}.kernel", (n_out, n_in), "linear")
        self.add(f"{key}.bias", f"{path}.bias", (n_out,))

    def norm(self, key: str, path: str) -> None:
        self.add(f"{key}.weight", f"{path}.scale", (self.width,))
        self.add(f"{key}.bias", f"{path}.bias", (self.width,))

    def resblocks(self, key: str, num_layers: int, mlp_width: int) -> None:
        d = self.width
        for i in range(num_layers):
            src, dst = f"{key}.resblocks.{i}", f"encoder.layers.{i}"
            self.norm(f"{src}.ln_1", f"{dst}.layer_norm1")
            # nn.MultiheadAttention packs q, k, v along the output axis, in that order.
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                self.add(f"{src}.attn.in_proj_weight", f"{dst}.self_attn.{proj}.kernel", (3 * d, d), "linear", (j, 3))
                self.add(f"{src}.attn.in_proj_bias", f"{dst}.self_attn.{proj}.bias", (3 * d,), "same", (j, 3))
            self.linear(f"{src}.attn.out_proj", f"{dst}.self_attn.out_proj", d, d)
            self.norm(f"{src}.ln_2", f"{dst}.layer_norm2")
            self.linear(f"{src}.mlp.c_fc", f"{dst}.mlp.fc1", d, mlp_width)
            self.linear(f"{src}.mlp.c_proj", f"{dst}.mlp.fc2", mlp_width, d)


def param_table(config: Mapping[str, Any] | None = None) -> list[Entry]:
    """Every tensor of an open_clip `CLIP` state dict, at the Flax paths of `conversion.clip_model.param_table`.

    `config`: a raw open_clip config, or one normalised by `normalize_config` (None: `VIT_H_14`). `visual.proj` and
    `text_projection` are (width, embed_dim) matrices applied as `x @ P`, already a Flax kernel's layout.
    """
    c = config if config is not None and "vision" in config and "text" in config else normalize_config(config)
    v, t, proj = c["vision"], c["text"], c["projection_dim"]
    d, p = v["hidden_size"], v["patch_size"]
    vis = _Tower("visual.", "vision_model", d)
    vis.add("conv1.weight", "embeddings.patch_embedding.kernel", (d, v["num_channels"], p, p), "conv")
    vis.add("class_embedding", "embeddings.class_embedding", (d,))
    vis.add("positional_embedding", "embeddings.position_embedding.embedding", (clip_model_conv.num_positions(v), d))
    vis.norm("ln_pre", "pre_layrnorm")
    vis.resblocks("transformer", v["num_hidden_layers"], v["intermediate_size"])
    vis.norm("ln_post", "post_layernorm")
    w = t["hidden_size"]
    txt = _Tower("", "text_model", w)
    txt.add("token_embedding.weight", "embeddings.token_embedding.embedding", (t["vocab_size"], w))
    txt.add("positional_embedding", "embeddings.position_embedding.embedding", (t["max_position_embeddings"], w))
    txt.resblocks("transformer", t["num_hidden_layers"], t["intermediate_size"])
    txt.norm("ln_final", "final_layer_norm")
    return [
        *vis.table,
        Entry("visual.proj", ("visual_projection", "kernel"), (d, proj)),
        *txt.table,
        Entry("text_projection", ("text_projection", "kernel"), (w, proj)),
        Entry("logit_scale", ("logit_scale",), ()),
    ]


def buffer_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of `BUFFERS` for a normalised config: the text tower's (context, context) causal mask."""
    ctx = config["text"]["max_position_embeddings"]
    return {"attn_mask": (ctx, ctx)}


def checkpoint_view(ckpt: Checkpoint, config: Mapping[str, Any]) -> Checkpoint:
    """`ckpt` as the strict check should see it: without the `BUFFERS` whose shape fits `config` (a mis-shaped one
    stays, to be reported), and with a one-element `logit_scale` read as the scalar it is. (1,) is what open_clip's
    `nonscalar_logit_scale` saves (and what other converters may write for a 0-d tensor); the loader reshapes the
    value to the model's ()."""
    shapes = buffer_shapes(config)
    drop = {k for k in BUFFERS if k in ckpt.files and ckpt.shape(k) == shapes[k]}
    view = {k: s for k, s in ckpt.shapes.items() if k not in drop}
    if view.get("logit_scale") == (1,):
        view["logit_scale"] = ()
    return Checkpoint(folder=ckpt.folder, files={k: f for k, f in ckpt.files.items() if k not in drop}, shapes=view)
