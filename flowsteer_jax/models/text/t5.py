"""T5 encoder (transformers `T5EncoderModel`) as Flax NNX modules.

Attribute names mirror transformers (`encoder.block.0.layer.0.SelfAttention.q`, `shared`) so `conversion/t5.py`
is a table. T5 is not scaled like other transformers: no 1/sqrt(d) in attention, no embedding scale, and its
residual stream grows large through the depth (T5-XXL's overflows fp16; in bf16 every residual add would round
to 8 bits). So, whatever the parameter dtype, the residual stream, the RMS statistics, the gated-FFN product,
the attention logits/softmax and the position bias stay float32; only matmul operands are in `dtype`, and with
fp16 weights `wo` runs in float32 as transformers keeps it. In float32 this is transformers' computation exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import t5 as t5_table
from flowsteer_jax.models.attention import check_implementation, dot_product_attention
from flowsteer_jax.models.config import schema_dataclass
from flowsteer_jax.models.layers import activation, linear


@schema_dataclass(t5_table.DEFAULTS)
class T5Config:
    """The fields of transformers' T5Config that the encoder uses, with its defaults.

    Fields and defaults: `conversion.t5.DEFAULTS` (vocab_size, d_model, d_kv, d_ff, num_layers, num_heads,
    relative_attention_num_buckets, relative_attention_max_distance, layer_norm_epsilon, feed_forward_proj,
    pad_token_id, eos_token_id).
    """

    def __post_init__(self):
        t5_table.normalize_config(dataclasses.asdict(self), "T5Config")

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config") -> T5Config:
        return cls(**t5_table.normalize_config(raw, source))

    def to_transformers(self) -> dict[str, Any]:
        return t5_table.to_transformers(dataclasses.asdict(self))


class T5EncoderOutput(NamedTuple):
    last_hidden_state: jax.Array  # after final_layer_norm, in the model dtype
    hidden_states: tuple[jax.Array, ...]  # embeddings, then every block's output; the last is last_hidden_state


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """transformers' bidirectional `T5Attention._relative_position_bucket`, in the same float32 arithmetic.

    Computed on the host: buckets depend only on the (static) sequence length.
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    n = np.abs(relative_position)
    max_exact = num_buckets // 2
    # The same float32 operations as torch, so that no distance can round into a neighbouring bucket.
    ratio = np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias; statistics and normalisation in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        if scale.dtype != jnp.float32:
            y = y.astype(scale.dtype)  # transformers rounds to the half dtype before the scale multiply
        return scale * y


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, implementation: str | None, **kw):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.implementation = cfg.num_heads, implementation
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q = linear(cfg.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.k = linear(cfg.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.v = linear(cfg.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.o = linear(inner, cfg.d_model, ("heads", "embed"), use_bias=False, **kw)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                embedding_metadata={"logical_axes": (None, "heads")},
                **kw,
            )

    def position_bias(self, n: int) -> jax.Array:
        """(1, heads, n, n) float32 additive bias from the relative-position buckets."""
        pos = np.arange(n)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)
        return table[jnp.asarray(buckets)].transpose(2, 0, 1)[None]

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.implementation == "cudnn":
            bias = bias.astype(q.dtype)  # cuDNN wants one dtype; XLA adds the float32 bias to float32 logits
        out = dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation=self.implementation)
        return self.o(out.reshape(*x.shape[:-1], -1))


class T5DenseActDense(nnx.Module):
    """`wi -> act -> wo`, or with `gated`: `act(wi_0 x) * wi_1 x -> wo` (T5 v1.1, SD3's T5-XXL)."""

    def __init__(self, cfg: T5Config, **kw):
        act, gated = t5_table.activation_of(cfg.feed_forward_proj)
        self.act, self.gated = activation(act), gated
        if gated:
            self.wi_0 = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), use_bias=False, **kw)
            self.wi_1 = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), use_bias=False, **kw)
        else:
            self.wi = linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), use_bias=False, **kw)
        self.wo = linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            h = self.act(self.wi_0(x).astype(jnp.float32)) * self.wi_1(x).astype(jnp.float32)
        else:
            h = self.act(self.wi(x).astype(jnp.float32))
        if self.wo.dtype == jnp.float16:
            # The gated product is what overflows fp16 in T5-XXL (transformers keeps `wo` in fp32 for it).
            return h @ self.wo.kernel[...].astype(jnp.float32)
        return self.wo(h.astype(self.wo.dtype))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, implementation: str | None, **kw):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, implementation, **kw)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=kw["param_dtype"])

    def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
        return h + self.SelfAttention(self.layer_norm(h).astype(dtype), bias, mask).astype(jnp.float32)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, **kw):
        self.DenseReluDense = T5DenseActDense(cfg, **kw)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=kw["param_dtype"])

    def __call__(self, h: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return h + self.DenseReluDense(self.layer_norm(h).astype(dtype)).astype(jnp.float32)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, implementation: str | None, **kw):
        self.layer = nnx.List(
            [T5LayerSelfAttention(cfg, has_relative_attention_bias, implementation, **kw), T5LayerFF(cfg, **kw)]
        )


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, implementation: str | None, **kw):
        self.block = nnx.List([T5Block(cfg, i == 0, implementation, **kw) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=kw["param_dtype"])


class T5Encoder(nnx.Module):
    """transformers' `T5EncoderModel`: `model(input_ids, attention_mask=None) -> T5EncoderOutput`.

    input_ids: (B, T) int; attention_mask: optional (B, T), 1 = attend (SD3 passes none). Relative position
    buckets make any T valid.
    """

    def __init__(
        self,
        cfg: T5Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
    ):
        check_implementation(implementation)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
        self.config, self.dtype = cfg, dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_metadata={"logical_axes": (None, "embed")}, **kw)
        self.encoder = T5Stack(cfg, implementation, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        h = self.shared(input_ids).astype(jnp.float32)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[-1])
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden_states = [h]
        for block in self.encoder.block:
            attn, ff = block.layer
            h = ff(attn(h, bias, mask, self.dtype), self.dtype)
            hidden_states.append(h)
        last = self.encoder.final_layer_norm(h).astype(self.dtype)
        return T5EncoderOutput(last, (*hidden_states[:-1], last))
