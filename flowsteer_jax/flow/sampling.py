"""The one sampler: sigma -> the model's timestep -> (CFG) velocity -> Euler, for every caller.

The pipeline, the trainer's sample grids, the digits evaluation, OTA (the teacher's trajectories) and the
train step all go through `model_velocity` (the only place a sigma becomes the model's timestep) and `sample`.
Models are MMDiT-like: `model(x_nhwc, timestep, prompt_embeds, pooled) -> v`, with diffusers' conventions
(`timestep = sigma * num_train_timesteps`, `v ~ eps - x0`; docs/design.md, "Conventions").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from flowsteer_jax.flow.integrators import cfg_velocity, euler

# diffusers' `FlowMatchEulerDiscreteScheduler` default, and SD3's scheduler config. Pipelines read the value of
# their folder's scheduler (`flow.schedules.scheduler_settings`); this is the fallback where there is none.
NUM_TRAIN_TIMESTEPS = 1000

Cond = Mapping[str, jax.Array]  # {"prompt_embeds": (B, S, J), "pooled": (B, P)}, batch-major
ModelFn = Callable[[jax.Array, jax.Array, Cond], jax.Array]


def timestep(sigma: jax.Array, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """The model's timestep input at noise level `sigma` (1 = noise, 0 = data)."""
    return sigma * num_train_timesteps


def model_velocity(model: Callable, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> ModelFn:
    """`(x, sigma, cond) -> v` of an MMDiT-like `model(x, timestep, prompt_embeds, pooled)`."""

    def velocity(x: jax.Array, sigma: jax.Array, cond: Cond) -> jax.Array:
        return model(x, timestep(sigma, num_train_timesteps), cond["prompt_embeds"], cond["pooled"])

    return velocity


def sample(
    model_fn: ModelFn,
    noise: jax.Array,
    sigmas: jax.Array,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float | jax.Array = 0.0,
    *,
    keep: Sequence[int] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Euler-integrate `model_fn` from `noise` at `sigmas[0]` to `sigmas[-1]`, one model call per interval.

    `guidance`: CFG weight `w` (python float, or array `()` / `(batch,)`); a python float `<= 1` runs the
    conditional branch alone (one forward per step, `uncond` unused), as diffusers' `guidance_scale`.
    `keep`: indices into `sigmas` whose states to return as well (see `integrators.euler`).
    Pure: jit it from the outside (`sigmas` and an array `guidance` may be traced).
    """
    return euler(cfg_velocity(model_fn, cond, uncond, guidance), noise, sigmas, keep=keep)
