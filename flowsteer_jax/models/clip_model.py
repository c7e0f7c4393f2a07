"""CLIP vision tower and full CLIP model (transformers `CLIPVisionModel` / `CLIPModel`) as Flax NNX modules.

Attribute names mirror transformers (`vision_model.embeddings.patch_embedding`, `vision_model.pre_layrnorm`,
`visual_projection`, `text_model.*`, `text_projection`, `logit_scale`) so `conversion/clip_model.py` is a table.
The text tower is our `CLIPTextTransformer` (models/text/clip.py); the vision encoder layers reuse its MLP and
attention projections, with bidirectional attention. Images are NHWC here; transformers takes NCHW.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from conversion import clip_model as clip_model_conv
from conversion import open_clip as open_clip_conv
from conversion.safetensors_io import Checkpoint, ConversionError, open_safetensors
from flowsteer_jax.models.attention import check_implementation
from flowsteer_jax.models.config import schema_dataclass
from flowsteer_jax.models.layers import linear
from flowsteer_jax.models.loading import fill_weights, load_weights
from flowsteer_jax.models.text.clip import (
    CLIPEncoder,
    CLIPTextConfig,
    CLIPTextTransformer,
    embedding,
    torch_layer_norm,
)
from flowsteer_jax.parallel import DEFAULT_RULES, MeshAxes


@schema_dataclass(clip_model_conv.DEFAULTS)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig that the model uses (`conversion.clip_model.DEFAULTS`)."""

    def __post_init__(self):
        clip_model_conv.normalize_config(dataclasses.asdict(self), "CLIPVisionConfig")

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "vision config") -> CLIPVisionConfig:
        return cls(**clip_model_conv.normalize_config(raw, source))

    @property
    def num_positions(self) -> int:
        return clip_model_conv.num_positions(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
    """transformers' CLIPConfig as the model reads it: both towers (each with the top-level `projection_dim`)."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = clip_model_conv.MODEL_DEFAULTS["projection_dim"]
    logit_scale_init_value: float = clip_model_conv.MODEL_DEFAULTS["logit_scale_init_value"]

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config") -> CLIPModelConfig:
        c = clip_model_conv.normalize_model_config(raw, source)
        return cls.from_normalized(c)

    @classmethod
    def from_normalized(cls, c: Mapping[str, Any]) -> CLIPModelConfig:
        return cls(
            text=CLIPTextConfig(**c["text"]),
            vision=CLIPVisionConfig(**c["vision"]),
            projection_dim=c["projection_dim"],
            logit_scale_init_value=c["logit_scale_init_value"],
        )


class CLIPVisionEmbeddings(nnx.Module):
    """Patch conv (no bias), class token, learned position embeddings (no interpolation: fixed image size)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d, p = cfg.hidden_size, cfg.patch_size
        self.image_size, self.dtype = cfg.image_size, dtype
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype), logical_axes=("embed",))
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, None, None, "embed")},
        )
        self.position_embedding = embedding(cfg.num_positions, d, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"image of {h}x{w}, the model takes {self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # (B, h/p, w/p, D), row-major as torch
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # encoder output (no final norm), class token first
    pooler_output: jax.Array  # post_layernorm(last_hidden_state[:, 0])


class CLIPVisionTransformer(nnx.Module):
    """transformers' `CLIPVisionModel` body: embeddings, pre_layrnorm, encoder, post_layernorm on the class token."""

    def __init__(self, cfg: CLIPVisionConfig, implementation: str | None, **kw):
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = torch_layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)  # sic: transformers' name
        self.encoder = CLIPEncoder(cfg, implementation, causal=False, **kw)
        self.post_layernorm = torch_layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, pixel_values_nhwc: jax.Array) -> CLIPVisionOutput:
        h = self.pre_layrnorm(self.embeddings(pixel_values_nhwc))
        for layer in self.encoder.layers:
            h = layer(h)
        return CLIPVisionOutput(h, self.post_layernorm(h[:, 0]))


def _kw(rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype | None) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)


class CLIPVision(nnx.Module):
    """`CLIPVisionModelWithProjection`: `vision_model` and `visual_projection` (no bias).

    `model(pixel_values_nhwc) -> (B, projection_dim)` image embeddings (projected, not normalised).
    """

    def __init__(
        self,
        cfg: CLIPVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
    ):
        check_implementation(implementation)
        kw = _kw(rngs, dtype, param_dtype)
        self.config, self.dtype = cfg, dtype
        self.vision_model = CLIPVisionTransformer(cfg, implementation, **kw)
        self.visual_projection = linear(cfg.hidden_size, cfg.projection_dim, ("embed", None), use_bias=False, **kw)

    def __call__(self, pixel_values_nhwc: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values_nhwc).pooler_output)


class CLIPModel(nnx.Module):
    """transformers' `CLIPModel`: text tower + `text_projection`, vision tower + `visual_projection`, `logit_scale`.

    `image_embeds(pixel_values_nhwc)` and `text_embeds(input_ids)` are `get_image_features` /
    `get_text_features` (projected, not normalised); `model(pixel_values_nhwc, input_ids)` is `logits_per_image`,
    (B_images, B_texts) = `exp(logit_scale) * cos(image_embeds, text_embeds)`. Text runs without an attention
    mask (the causal mask and EOS pooling alone), as `CLIPModel(input_ids=...)` without `attention_mask` does.
    """

    def __init__(
        self,
        cfg: CLIPModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
    ):
        check_implementation(implementation)
        kw = _kw(rngs, dtype, param_dtype)
        self.config, self.dtype = cfg, dtype
        self.text_model = CLIPTextTransformer(cfg.text, implementation, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, implementation, **kw)
        d_text, d_vision, proj = cfg.text.hidden_size, cfg.vision.hidden_size, cfg.projection_dim
        self.text_projection = linear(d_text, proj, ("embed", None), use_bias=False, **kw)
        self.visual_projection = linear(d_vision, proj, ("embed", None), use_bias=False, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, kw["param_dtype"]), logical_axes=())

    def image_embeds(self, pixel_values_nhwc: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values_nhwc).pooler_output)

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        _, pooled, _ = self.text_model(input_ids)
        return self.text_projection(pooled)

    def __call__(self, pixel_values_nhwc: jax.Array, input_ids: jax.Array) -> jax.Array:
        img = self.image_embeds(pixel_values_nhwc).astype(jnp.float32)
        txt = self.text_embeds(input_ids).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return img @ txt.T * jnp.exp(self.logit_scale[...].astype(jnp.float32))


def load_clip_model(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
) -> CLIPModel:
    """A transformers `CLIPModel` folder (config.json with text_config/vision_config + single or sharded safetensors).

    Strict: an unknown, missing or wrongly shaped tensor raises one ConversionError naming each.
    """
    raw, config_path = clip_model_conv.read_config(folder)
    cfg = CLIPModelConfig.from_normalized(raw)

    def build() -> CLIPModel:
        return CLIPModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation)

    return load_weights(build, folder, clip_model_conv.param_table(raw), config_path, dtype, mesh, rules)


def load_open_clip_model(
    path: str,
    config: str | Mapping[str, Any] | None = None,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
) -> CLIPModel:
    """An open_clip `CLIP` state dict saved as one `.safetensors` file (`conversion.torch_files` converts an
    upstream `.pt`) -> `CLIPModel`. `config`: an open_clip model-config JSON path or dict; None: ViT-H-14 (HPSv2).

    Strict as `load_clip_model`: one ConversionError names every unknown, missing or mis-shaped tensor.
    """
    if isinstance(config, str):
        cfg, config_source = open_clip_conv.read_config(config), config
    else:
        cfg = open_clip_conv.normalize_config(config)
        config_source = "the open_clip ViT-H-14 config" if config is None else "the open_clip config"
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such safetensors file")
    with open_safetensors(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ckpt = open_clip_conv.checkpoint_view(Checkpoint(path, dict.fromkeys(shapes, path), shapes), cfg)
    model_cfg = CLIPModelConfig.from_normalized(cfg)

    def build() -> CLIPModel:
        return CLIPModel(model_cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation)

    # `fill_weights`, not `load_weights`: one file, not a folder (a weights folder may hold HPS v2 and v2.1).
    return fill_weights(build, ckpt, open_clip_conv.param_table(cfg), config_source, dtype, mesh, rules)
