"""Small building blocks shared by the NNX models, named like their diffusers counterparts.

Every parameter carries `logical_axes` metadata (docs/design.md, "Conventions"); `flowsteer_jax.parallel` turns
those names into shardings through the config's rules table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


class Buffer(nnx.Variable):
    """A checkpointed constant (e.g. SD3's positional table): loaded and saved, never trained."""


def linear(
    n_in: int,
    n_out: int,
    axes: Axes,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    use_bias: bool = True,
) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": axes[-1:]},
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine, computed in float32 (two-pass variance, as torch does)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("kv",))

    def __call__(self, x: jax.Array) -> jax.Array:
        var = jnp.square(x.astype(jnp.float32)).mean(-1, keepdims=True)
        y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNorm(nnx.Module):
    """adaLN modulation: `linear(silu(temb))` split into `chunks` vectors (diffusers AdaLayerNormZero/-X/-Continuous).

    Only the projection lives here (`norm1.linear`); how the chunks are used differs per caller and is
    spelled out there.
    """

    def __init__(self, dim: int, chunks: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.chunks = chunks
        self.linear = linear(dim, chunks * dim, ("embed", "adaln"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, temb: jax.Array) -> Sequence[jax.Array]:
        return jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)


class FeedForward(nnx.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj` -> tanh-GELU -> `net.2`."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Index 1 is the dropout slot of diffusers' `net` list: kept so that paths read `net.0`/`net.2`.
        self.net = nnx.List([_GeluProj(dim, 4 * dim, **kw), None, linear(4 * dim, dim, ("mlp", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class _GeluProj(nnx.Module):
    def __init__(self, n_in: int, n_out: int, **kw):
        self.proj = linear(n_in, n_out, ("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The transformers/diffusers activation called `name` (`ACT2FN` / `get_activation` spelling)."""
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's default GELU is the erf form
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported (one of {sorted(table)})")
    return table[name]
