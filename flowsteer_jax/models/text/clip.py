"""CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`) as Flax NNX modules.

Attribute names mirror transformers (`text_model.encoder.layers.0.self_attn.q_proj`, `text_projection`) so
`conversion/clip.py` is a table. SD3 reads the penultimate entry of `hidden_states` and the projected pooled
output (`text_embeds`) of both of its CLIP encoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from conversion import clip as clip_table
from flowsteer_jax.models.attention import check_implementation, dot_product_attention
from flowsteer_jax.models.config import schema_dataclass
from flowsteer_jax.models.layers import activation, linear


@schema_dataclass(clip_table.DEFAULTS, architecture=clip_table.ARCHITECTURES[0])
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that the model uses, with its defaults.

    Fields and defaults: `conversion.clip.DEFAULTS` (vocab_size, hidden_size, intermediate_size, projection_dim,
    num_hidden_layers, num_attention_heads, max_position_embeddings, hidden_act, layer_norm_eps, pad_token_id,
    bos_token_id, eos_token_id), then `architecture` ("CLIPTextModelWithProjection" or "CLIPTextModel").
    """

    def __post_init__(self):
        clip_table.normalize_config(self.to_transformers(), "CLIPTextConfig")

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config") -> CLIPTextConfig:
        return cls(**clip_table.normalize_config(raw, source))

    def to_transformers(self) -> dict[str, Any]:
        return clip_table.to_transformers({**dataclasses.asdict(self), "architectures": [self.architecture]})

    @property
    def with_projection(self) -> bool:
        return self.architecture == "CLIPTextModelWithProjection"


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # after final_layer_norm
    pooler_output: jax.Array  # last_hidden_state at the EOS token
    text_embeds: jax.Array | None  # text_projection(pooler_output); None without a projection
    hidden_states: tuple[jax.Array, ...]  # embeddings, then every layer's output (before final_layer_norm)


def torch_layer_norm(dim: int, eps: float, **kw) -> nnx.LayerNorm:
    # Two-pass variance as torch computes it: the default fast variance loses digits at large means.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        scale_metadata={"logical_axes": ("embed",)},
        bias_metadata={"logical_axes": ("embed",)},
        **kw,
    )


def embedding(n: int, dim: int, **kw) -> nnx.Embed:
    return nnx.Embed(n, dim, embedding_metadata={"logical_axes": (None, "embed")}, **kw)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, **kw):
        self.token_embedding = embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = embedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        n = input_ids.shape[-1]
        if n > self.position_embedding.num_embeddings:
            raise ValueError(
                f"sequence of {n} tokens, max_position_embeddings={self.position_embedding.num_embeddings}"
            )
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention: causal in the text tower, bidirectional in the vision tower (`models/clip_model`)."""

    def __init__(self, cfg: CLIPTextConfig, implementation: str | None, *, causal: bool = True, **kw):
        d = cfg.hidden_size
        self.heads, self.implementation, self.causal = cfg.num_attention_heads, implementation, causal
        self.q_proj = linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = dot_product_attention(q, k, v, is_causal=self.causal, implementation=self.implementation)
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, **kw):
        self.act = activation(cfg.hidden_act)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, implementation: str | None, *, causal: bool = True, **kw):
        self.self_attn = CLIPAttention(cfg, implementation, causal=causal, **kw)
        self.layer_norm1 = torch_layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = torch_layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, implementation: str | None, *, causal: bool = True, **kw):
        layers = [CLIPEncoderLayer(cfg, implementation, causal=causal, **kw) for _ in range(cfg.num_hidden_layers)]
        self.layers = nnx.List(layers)


class CLIPTextTransformer(nnx.Module):
    """transformers' `CLIPTextModel` body: embeddings, causal encoder, final LayerNorm, EOS pooling."""

    def __init__(self, cfg: CLIPTextConfig, implementation: str | None, **kw):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, implementation, **kw)
        self.final_layer_norm = torch_layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        h = self.embeddings(input_ids)
        hidden_states = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            hidden_states.append(h)
        last = self.final_layer_norm(h)
        if self.eos_token_id == 2:
            # Configs older than transformers PR #24773 say eos=2; transformers then pools at the largest id,
            # which is the EOS token of the original CLIP vocabulary. SD3's CLIP configs are such configs.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # first EOS: pad may equal EOS
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return last, pooled, tuple(hidden_states)


class CLIPText(nnx.Module):
    """`CLIPTextModelWithProjection` (or `CLIPTextModel` when `cfg.architecture` says so).

    `model(input_ids) -> CLIPTextOutput`; input_ids is (B, T) int with T <= max_position_embeddings. No
    attention mask, as SD3 calls it: the causal mask alone decides what each token sees.
    """

    def __init__(
        self,
        cfg: CLIPTextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
    ):
        check_implementation(implementation)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
        self.config, self.dtype = cfg, dtype
        self.text_model = CLIPTextTransformer(cfg, implementation, **kw)
        self.text_projection = (
            linear(cfg.hidden_size, cfg.projection_dim, ("embed", None), use_bias=False, **kw)
            if cfg.with_projection
            else None
        )

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        last, pooled, hidden_states = self.text_model(input_ids)
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last, pooled, text_embeds, hidden_states)
