"""SD3 joint attention (diffusers `Attention` + `JointAttnProcessor2_0`) and the one `dot_product_attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowsteer_jax import parallel
from flowsteer_jax.models.layers import RMSNorm, linear
from flowsteer_jax.models.splash import splash_attention

# None: chosen by the platform the program is compiled for (`resolve_implementation`). "xla": the plain
# softmax(QK^T)V (materialised logits). "cudnn": cuDNN's fused flash kernel (GPU). "splash": Pallas splash
# attention (TPU flash kernel).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "splash")
AUTO_IMPLEMENTATION = {"gpu": "cudnn", "tpu": "splash"}  # any other platform: "xla"
# Flash kernels want sequence lengths in whole tiles (cuDNN refuses odd lengths when training, splash needs
# whole blocks): SD3's joint sequence (4096 image + 333 text tokens = 4429) is padded to this multiple.
PAD_MULTIPLE = 128
# Above this head width neither flash kernel applies (the VAE's single 512-wide head); on GPU/TPU such attention
# runs in query chunks of this many rows, so its logits never exist whole (16384^2 per image at 1024^2).
MAX_FLASH_HEAD_DIM, QUERY_CHUNK = 256, 1024


def check_implementation(implementation: str | None) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}")


def resolve_implementation(implementation: str | None, platform: str | None = None) -> str:
    """The kernel an `implementation` setting means on `platform` (default: `parallel.current_platform()`)."""
    check_implementation(implementation)
    if implementation is not None:
        return implementation
    return AUTO_IMPLEMENTATION.get(platform or parallel.current_platform(), "xla")


def _pad_tokens(x: jax.Array, n: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None, implementation: str, multiple: int = PAD_MULTIPLE
) -> jax.Array:
    """`jax.nn.dot_product_attention` with both sequences padded to `multiple` and the padding masked.

    The padded keys are excluded through `key_value_seq_lengths` (no score reaches them), the padded queries
    are sliced off: exactly the unpadded attention, values and gradients, for any kernel that honours the
    lengths ("cudnn" on GPU; "xla" in the CPU parity test).
    """
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = -(-t // multiple) * multiple, -(-s // multiple) * multiple
    if (tp, sp) == (t, s):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    q, k, v = _pad_tokens(q, tp), _pad_tokens(k, sp), _pad_tokens(v, sp)
    q_len, kv_len = jnp.full((b,), t, jnp.int32), jnp.full((b,), s, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, query_seq_lengths=q_len, key_value_seq_lengths=kv_len, implementation=implementation
    )
    return out[:, :t]


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None, chunk: int = QUERY_CHUNK):
    """XLA attention over blocks of `chunk` queries in turn (`lax.map`): logits of (chunk, S) at a time."""
    b, t = q.shape[:2]
    if t <= chunk:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    n = -(-t // chunk)
    blocks = _pad_tokens(q, n * chunk).reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: jax.nn.dot_product_attention(qc, k, v, scale=scale, implementation="xla"), blocks)
    return out.swapaxes(0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :t]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """The one attention entry point: `jax.nn.dot_product_attention`'s `(B, T, N, H)` layout and arguments.

    `implementation=None` picks the kernel for the platform being compiled for (the mesh's devices, so a
    compile-only GPU/TPU target counts): cuDNN flash on GPU, splash on TPU, XLA elsewhere. The flash kernels
    serve plain attention (MMDiT, discriminator) at any sequence length, padded exactly; attention with a bias,
    mask or causal mask (the text encoders, short sequences) takes XLA unless a kernel is named explicitly, and
    heads wider than the kernels allow (the VAE) run in query chunks on GPU/TPU, as does float32 on GPU (cuDNN's
    fused kernels take half precision). On CPU, XLA attention runs in a CPU-friendly layout (`_cpu_attention`).
    """
    platform = parallel.current_platform()
    plain = bias is None and mask is None and not is_causal
    impl = resolve_implementation(implementation, platform)
    if implementation is None and not _flash_applies(impl, q, plain):
        impl = "xla"
    if impl == "cudnn" and plain:
        return padded_attention(q, k, v, scale=scale, implementation="cudnn")
    if impl == "splash":
        if not plain:
            raise ValueError("splash attention takes no bias, mask or causal mask; use 'xla' or 'cudnn'")
        return splash_attention(q, k, v, scale=scale, interpret=platform != "tpu")
    if impl == "xla" and platform == "cpu":
        return _cpu_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale)
    if implementation is None and plain and q.shape[1] > QUERY_CHUNK:  # a wide head on GPU/TPU
        return chunked_attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
    )


def _flash_applies(impl: str, q: jax.Array, plain: bool) -> bool:
    """Whether the platform's flash kernel serves this attention: no bias/mask, head width and (cuDNN) dtype."""
    if impl == "xla" or not plain or q.shape[-1] > MAX_FLASH_HEAD_DIM:
        return False
    return impl != "cudnn" or q.dtype in (jnp.bfloat16, jnp.float16)  # cuDNN's fused kernels: half precision


def _cpu_attention(q, k, v, *, bias, mask, is_causal, scale) -> jax.Array:
    """XLA attention in `(B, N, T, H)` layout with the softmax normalisation after the value product: XLA:CPU
    then runs contiguous batched GEMMs and makes one pass less over the logits."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
    logits = jnp.einsum("bntd,bnsd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)  # jax's "large negative"
    # The max only keeps exp in range; it cancels in the ratio, so it carries no gradient.
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("bnts,bnsd->bntd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / e.sum(-1, keepdims=True)).astype(v.dtype).swapaxes(1, 2)


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
        out = dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        ctx_out = self.to_add_out(out[:, n:]) if self.context_out else None
        return self.to_out[0](out[:, :n]), ctx_out
