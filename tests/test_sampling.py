"""`flow.sampling`: the one sampler and the one sigma -> timestep conversion, against hand-written Euler/CFG."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS, model_velocity, sample, timestep
from flowsteer_jax.flow.schedules import sigmas as make_sigmas


class Toy:
    """An MMDiT-like model `(x, timestep, prompt_embeds, pooled) -> v` whose output depends on every input."""

    def __call__(self, x, t, embeds, pooled):
        scale = (t / 1000.0)[:, None, None, None]
        return jnp.sin(x) * scale + embeds.mean((1, 2))[:, None, None, None] + pooled[:, :1, None, None]


def _cond(rng, b, shift=0.0):
    return {
        "prompt_embeds": jnp.asarray(rng.standard_normal((b, 3, 5)) + shift, jnp.float32),
        "pooled": jnp.asarray(rng.standard_normal((b, 4)) + shift, jnp.float32),
    }


def _manual(model, x, sigmas, cond, uncond, w, ntt):
    x = np.asarray(x, np.float64)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = jnp.full((x.shape[0],), s * ntt, jnp.float32)
        v = np.asarray(model(jnp.asarray(x, jnp.float32), t, cond["prompt_embeds"], cond["pooled"]), np.float64)
        if uncond is not None:
            vu = np.asarray(model(jnp.asarray(x, jnp.float32), t, uncond["prompt_embeds"], uncond["pooled"]))
            v = vu + w * (v - vu)
        x = x + (s_next - s) * v
    return x


@pytest.mark.parametrize("guidance", [0.0, 4.0])
@pytest.mark.parametrize("ntt", [NUM_TRAIN_TIMESTEPS, 500])
def test_sample_is_euler_over_the_model_at_scaled_timesteps(rng, guidance, ntt):
    b, model = 3, Toy()
    noise = jnp.asarray(rng.standard_normal((b, 2, 4, 1)), jnp.float32)
    cond, uncond = _cond(rng, b), _cond(rng, b, shift=1.0)
    sig = make_sigmas(4, "rectified", 3.0)
    got = sample(model_velocity(model, ntt), noise, jnp.asarray(sig), cond, uncond, guidance)
    want = _manual(model, noise, sig, cond, uncond if guidance > 1 else None, guidance, ntt)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sample_keeps_requested_states(rng):
    model, noise, cond = Toy(), jnp.asarray(rng.standard_normal((2, 2, 4, 1)), jnp.float32), _cond(rng, 2)
    sig = make_sigmas(4, "rectified", 3.0)
    final, kept = sample(model_velocity(model), noise, jnp.asarray(sig), cond, keep=(0, 2, 4))
    np.testing.assert_array_equal(np.asarray(kept[0]), np.asarray(noise))
    np.testing.assert_array_equal(np.asarray(kept[2]), np.asarray(final))
    half = sample(model_velocity(model), noise, jnp.asarray(sig[:3]), cond)
    np.testing.assert_allclose(np.asarray(kept[1]), np.asarray(half), rtol=1e-6, atol=1e-6)


def test_timestep_scale():
    assert float(timestep(jnp.float32(0.25))) == 250.0
    assert float(timestep(jnp.float32(0.25), 500)) == 125.0
