"""The attention entry point: our XLA:CPU path, the padding around flash kernels and the query-chunked path, each
against `jax.nn.dot_product_attention` (its XLA implementation), values and grads; the choice of kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowsteer_jax.models.attention import (
    _flash_applies,
    chunked_attention,
    dot_product_attention,
    padded_attention,
    resolve_implementation,
)

B, T, N, H = 2, 7, 3, 8


def _inputs(dtype):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((B, T, N, H)), dtype) for _ in range(3))
    bias = jnp.asarray(r.standard_normal((1, N, T, T)), jnp.float32)
    mask = jnp.asarray(r.uniform(size=(B, 1, 1, T)) > 0.3).at[..., 0].set(True)
    return q, k, v, bias, mask


CASES = {
    "plain": {},
    "scale": dict(scale=0.3),
    "bias+mask (T5)": dict(bias=True, mask=True, scale=1.0),
    "causal (CLIP)": dict(is_causal=True),
    "causal+mask": dict(is_causal=True, mask=True),
}


@pytest.mark.parametrize("case", CASES)
def test_cpu_path_equals_jax_xla_attention(case):
    assert jax.default_backend() == "cpu"  # the path under test only exists there
    q, k, v, bias, mask = _inputs(jnp.float32)
    kw = dict(CASES[case])
    kw["bias"] = bias if kw.get("bias") else None
    kw["mask"] = mask if kw.get("mask") else None

    def loss(fn, q, k, v, bias):
        out = fn(q, k, v, **{**kw, "bias": bias if kw["bias"] is not None else None})
        return jnp.sum(out * jnp.cos(out)), out

    ours = jax.value_and_grad(lambda *a: loss(dot_product_attention, *a), argnums=(0, 1, 2, 3), has_aux=True)
    ref = jax.value_and_grad(
        lambda *a: loss(lambda *x, **y: jax.nn.dot_product_attention(*x, **y, implementation="xla"), *a),
        argnums=(0, 1, 2, 3),
        has_aux=True,
    )
    with jax.default_matmul_precision("highest"):
        (_, out), grads = jax.jit(ours)(q, k, v, bias)
        (_, out_ref), grads_ref = jax.jit(ref)(q, k, v, bias)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_cpu_path_bfloat16_close_to_float32_reference():
    q, k, v, _, mask = _inputs(jnp.bfloat16)
    out = dot_product_attention(q, k, v, mask=mask)
    ref = jax.nn.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)), mask=mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_fully_masked_rows_average_like_jax():
    q, k, v, _, _ = _inputs(jnp.float32)
    mask = jnp.zeros((B, 1, 1, T), bool)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask=mask), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,s", [(141, 141), (77, 141), (128, 128), (4429 // 16, 4429 // 16)])
def test_padded_attention_equals_unpadded(t, s):
    """The padding around the flash kernels (cuDNN here) is exact: values and gradients, odd lengths."""
    r = np.random.default_rng(1)
    q = jnp.asarray(r.standard_normal((2, t, 3, 16)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((2, s, 3, 16)), jnp.float32) for _ in range(2))

    def run(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (val, grads) = run(lambda q, k, v: padded_attention(q, k, v, scale=0.2, implementation="xla"))
    (val_ref, grads_ref) = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.2, implementation="xla"))
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(np.abs(g_ref).max()))


def test_chunked_attention_equals_whole():
    """The query-chunked path of wide-head attention (the VAE's) on GPU/TPU: same values."""
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.standard_normal((2, 300, 1, 32)), jnp.float32) for _ in range(3))
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(chunked_attention(q, k, v, scale=None, chunk=128), ref, rtol=1e-5, atol=1e-6)


def test_implementation_follows_the_platform():
    assert [resolve_implementation(None, p) for p in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "xla"]
    assert resolve_implementation("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="flash"):
        resolve_implementation("flash", "gpu")
    # The chosen flash kernel steps aside for what it cannot take: cuDNN in float32, masks, the VAE's 512-wide head.
    q16, q32, wide = jnp.zeros((1, 8, 2, 64), jnp.bfloat16), jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 1, 512))
    assert _flash_applies("cudnn", q16, True) and _flash_applies("splash", q32, True)
    assert not _flash_applies("cudnn", q32, True) and not _flash_applies("cudnn", q16, False)
    assert not _flash_applies("splash", wide, True)
