"""Splash attention (Pallas interpret mode on CPU) against `jax.nn.dot_product_attention`, values and grads."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowsteer_jax.models.splash import splash_attention

# (B, Tq, Tkv, N, H, scale): a block multiple, odd lengths (exact padding), a non-default scale, kv != q length.
CASES = {
    "T=128": (2, 128, 128, 2, 64, None),
    "T=141": (2, 141, 141, 3, 64, None),
    "T=77 H=128 scale": (2, 77, 77, 2, 128, 0.3),
    "Tq=77 Tkv=141": (2, 77, 141, 2, 64, None),
    "Tq=77 Tkv=128": (2, 77, 128, 2, 64, None),  # padded queries have no padded keys to attend to
}


def _inputs(b, tq, tkv, n, h, seed=0):
    r = np.random.default_rng(seed)
    shape = lambda t: (b, t, n, h)  # noqa: E731
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in (shape(tq), shape(tkv), shape(tkv)))


def _value_and_grads(fn, q, k, v):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _reference(q, k, v, scale=None):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


def _assert_matches(out, grads, out_ref, grads_ref):
    for x in (out, *grads):
        assert np.isfinite(np.asarray(x)).all()
    # atol relative to each array's scale: entries near zero only carry float32 rounding of the larger ones.
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5 * np.abs(out_ref).max())
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())


@pytest.mark.parametrize("case", CASES)
def test_splash_equals_xla_attention(case):
    b, tq, tkv, n, h, scale = CASES[case]
    q, k, v = _inputs(b, tq, tkv, n, h)
    with jax.default_matmul_precision("highest"):
        out, grads = _value_and_grads(lambda *a: splash_attention(*a, scale=scale, interpret=True), q, k, v)
        out_ref, grads_ref = _value_and_grads(lambda *a: _reference(*a, scale=scale), q, k, v)
    assert out.shape == out_ref.shape and out.dtype == v.dtype
    _assert_matches(out, grads, out_ref, grads_ref)


def test_splash_under_single_device_mesh():
    q, k, v = _inputs(2, 77, 77, 2, 64)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))  # no shard_map
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh):
        out, grads = _value_and_grads(lambda *a: splash_attention(*a, interpret=True), q, k, v)
    out_ref, grads_ref = _value_and_grads(_reference, q, k, v)
    _assert_matches(out, grads, out_ref, grads_ref)


_SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tests.test_splash import _assert_matches, _inputs, _reference, _value_and_grads
    from flowsteer_jax.models.splash import splash_attention

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4
    q, k, v = _inputs(2, 77, 77, 2, 64)
    ref = _value_and_grads(_reference, q, k, v)
    fn = lambda *a: splash_attention(*a, interpret=True)
    # batch over data (2), heads over tensor (2); odd T, so each shard pads. The project's meshes are Auto.
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
            _assert_matches(*_value_and_grads(fn, q, k, v), *ref)
    """
)


def test_splash_shard_map_on_four_cpu_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
