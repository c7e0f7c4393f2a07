"""Euler-in-scan integrator and one-forward classifier-free guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowsteer_jax.flow import schedules
from flowsteer_jax.flow.integrators import cfg_velocity, euler

B, H, W, C = 3, 4, 4, 2


def velocity(x, sigma):
    # Nonlinear in both x and sigma so step order and the sigma fed to each step matter.
    s = sigma[:, None, None, None]
    return jnp.tanh(x) * (1.0 + s) - 0.5 * s**2 * x


def reference_euler(velocity_fn, x, sigmas):
    states = [x]
    for i in range(len(sigmas) - 1):
        sigma = jnp.full((x.shape[0],), sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity_fn(x, sigma)
        states.append(x)
    return states


@pytest.fixture
def x0(rng):
    return jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)


@pytest.mark.parametrize("kind", ["rectified", "diffusers"])
def test_euler_matches_python_loop(x0, kind):
    sig = schedules.sigmas(8, kind)
    ref = reference_euler(velocity, x0, sig)
    out = jax.jit(lambda x, s: euler(velocity, x, s))(x0, jnp.asarray(sig))
    np.testing.assert_allclose(out, ref[-1], rtol=1e-6, atol=1e-6)


def test_euler_keep_states(x0):
    sig = schedules.sigmas(8, "rectified")
    keep = (0, 2, 5, 5, 8)
    ref = reference_euler(velocity, x0, sig)
    # sigmas traced, keep static.
    run = jax.jit(lambda x, s: euler(velocity, x, s, keep=keep))
    final, states = run(x0, jnp.asarray(sig))
    assert states.shape == (len(keep), *x0.shape)
    np.testing.assert_allclose(final, ref[-1], rtol=1e-6, atol=1e-6)
    for slot, i in enumerate(keep):
        np.testing.assert_allclose(states[slot], ref[i], rtol=1e-6, atol=1e-6, err_msg=f"keep index {i}")
    np.testing.assert_array_equal(states[0], x0)
    np.testing.assert_array_equal(states[-1], final)


def test_euler_passes_broadcast_sigma_and_keeps_dtype(x0):
    seen = []

    def spy(x, sigma):
        seen.append(sigma.shape)
        return velocity(x, sigma)

    out = euler(spy, x0.astype(jnp.bfloat16), jnp.asarray(schedules.sigmas(4)))
    assert out.dtype == jnp.bfloat16
    assert seen == [(B,)]  # traced once by the scan, sigma broadcast to the batch


def test_euler_rejects_bad_keep(x0):
    with pytest.raises(ValueError, match="keep"):
        euler(velocity, x0, jnp.asarray(schedules.sigmas(4)), keep=(0, 5))


def make_model():
    """A conditioned toy model plus a record of the batch size of every (traced) call."""
    batches = []

    def model(x, sigma, cond):
        batches.append(x.shape[0])
        emb = jnp.tanh(cond["tokens"].mean(axis=1)) + cond["pooled"]  # (batch, C)
        return velocity(x, sigma) + emb[:, None, None, :] * (1.0 - sigma[:, None, None, None])

    return model, batches


@pytest.fixture
def conds(rng):
    def one():
        return {
            "tokens": jnp.asarray(rng.standard_normal((B, 5, C)), jnp.float32),
            "pooled": jnp.asarray(rng.standard_normal((B, C)), jnp.float32),
        }

    return one(), one()


@pytest.mark.parametrize("guidance", [7.0, "per_sample"])
def test_cfg_matches_two_forward_reference(x0, conds, guidance):
    cond, uncond = conds
    w = jnp.asarray([1.5, 7.0, 13.0]) if guidance == "per_sample" else guidance
    w_b = jnp.reshape(jnp.asarray(w), (-1, 1, 1, 1))
    model, batches = make_model()

    def ref_velocity(x, sigma):
        v_c, v_u = model(x, sigma, cond), model(x, sigma, uncond)
        return v_u + w_b * (v_c - v_u)

    sig = schedules.sigmas(6, "rectified")
    ref = reference_euler(ref_velocity, x0, sig)[-1]

    batches.clear()
    if isinstance(w, float):  # a static python float, closed over
        run = jax.jit(lambda x, s: euler(cfg_velocity(model, cond, uncond, w), x, s))
        out = run(x0, jnp.asarray(sig))
    else:  # a traced per-sample array
        run = jax.jit(lambda x, s, w: euler(cfg_velocity(model, cond, uncond, w), x, s))
        out = run(x0, jnp.asarray(sig), w)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # One forward per step, on the doubled batch; the scan body is traced exactly once.
    assert batches == [2 * B]


def test_cfg_one_eager_call_per_step(x0, conds):
    cond, uncond = conds
    model, batches = make_model()
    v = cfg_velocity(model, cond, uncond, 4.0)
    sigma = jnp.full((B,), 0.5)
    out = v(x0, sigma)
    assert batches == [2 * B]
    v_c, v_u = model(x0, sigma, cond), model(x0, sigma, uncond)
    np.testing.assert_allclose(out, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_no_guidance_is_one_conditional_call(x0, conds, guidance):
    cond, _ = conds
    model, batches = make_model()
    v = cfg_velocity(model, cond, None, guidance)
    sigma = jnp.full((B,), 0.25)
    out = v(x0, sigma)
    assert batches == [B]
    np.testing.assert_array_equal(out, model(x0, sigma, cond))
