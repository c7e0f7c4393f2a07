"""SD3 joint attention (diffusers `Attention` + `JointAttnProcessor2_0`), through `jax.nn.dot_product_attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowsteer_jax.models.layers import RMSNorm, linear

# `jax.nn.dot_product_attention(implementation=...)`: None lets XLA choose, "cudnn" is the fused GPU kernel.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def check_implementation(implementation: str | None) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}")


class Attention(nnx.Module):
    """Multi-head attention over image tokens, optionally joint with context tokens (`joint=True`).

    `context_out=False` is the last SD3 block (`context_pre_only`): context tokens are attended to but their
    attention output is dropped, so there is no `to_add_out`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        joint: bool,
        context_out: bool = True,
        qk_norm: str | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        check_implementation(implementation)
        self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
        self.joint, self.context_out = joint, joint and context_out
        inner = heads * head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = linear(dim, inner, ("embed", "heads"), **kw)
        self.to_k = linear(dim, inner, ("embed", "heads"), **kw)
        self.to_v = linear(dim, inner, ("embed", "heads"), **kw)
        self.to_out = nnx.List([linear(inner, dim, ("heads", "embed"), **kw)])
        norm = (lambda: RMSNorm(head_dim, param_dtype=param_dtype)) if qk_norm == "rms_norm" else (lambda: None)
        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.add_q_proj = linear(dim, inner, ("embed", "heads"), **kw)
            self.add_k_proj = linear(dim, inner, ("embed", "heads"), **kw)
            self.add_v_proj = linear(dim, inner, ("embed", "heads"), **kw)
            self.norm_added_q, self.norm_added_k = norm(), norm()
            if self.context_out:
                self.to_add_out = linear(inner, dim, ("heads", "embed"), **kw)

    def _qkv(self, x: jax.Array, q, k, v, norm_q, norm_k) -> tuple[jax.Array, jax.Array, jax.Array]:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(q(x)), split(k(x)), split(v(x))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        n = x.shape[1]
        if self.joint:
            cq, ck, cv = self._qkv(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            q, k, v = (jnp.concatenate(t, axis=1) for t in ((q, cq), (k, ck), (v, cv)))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        ctx_out = self.to_add_out(out[:, n:]) if self.context_out else None
        return self.to_out[0](out[:, :n]), ctx_out
