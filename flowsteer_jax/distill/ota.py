"""Teacher start/end points of the K windows: OTA (FlowSteer) or interpolation (PeRFlow).

Windows are indexed from noise to data: window k spans `[b[k], b[k+1]]` of the boundaries
`b = sigmas(K, schedule, shift)` (`b[0] = 1`, `b[K] = 0`). Everything integrates with the project's one
Euler integrator (`flow.integrators.euler`, one `lax.scan`), CFG (`cfg_velocity`) and model velocity
(`flow.sampling.model_velocity`).

- OTA: one teacher trajectory from `z_1 = eps` down to 0 over `teacher_steps` Euler steps on a grid
  containing every boundary; the K + 1 boundary states are kept. Window k starts at state k and ends at
  state k + 1, so one trajectory serves all K windows.
- interpolate: window k starts at `(1 - b[k]) x0 + b[k] eps` (off the teacher's trajectory) and the teacher
  solves only inside the window, on the same sub-grid OTA uses there (the K window solves run batched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flowsteer_jax.flow import schedules
from flowsteer_jax.flow.integrators import cfg_velocity, euler
from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS, model_velocity

START_POINTS = ("ota", "interpolate")


def window_boundaries(num_windows: int, schedule: str = "rectified", shift: float = 3.0) -> np.ndarray:
    """The K + 1 window boundaries (float32, 1 -> 0): the student's inference grid."""
    return schedules.sigmas(int(num_windows), schedule, shift)


def _unshift(s: np.ndarray, shift: float) -> np.ndarray:
    return s / (shift - (shift - 1) * s)


def teacher_grid(
    num_windows: int, teacher_steps: int, schedule: str = "rectified", shift: float = 3.0
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The teacher's Euler grid over [1, 0] containing the window boundaries, and each boundary's index.

    Steps are shared out between windows in proportion to their length in unshifted time (largest
    remainder, at least one each) and spaced uniformly in unshifted time inside each window, then shifted.
    For the rectified schedule with `K | teacher_steps` this is exactly `sigmas(teacher_steps, "rectified")`.
    Boundary entries are `window_boundaries(...)` themselves, bit for bit.
    """
    k = int(num_windows)
    boundaries = window_boundaries(k, schedule, shift)
    if teacher_steps < k:
        raise ValueError(f"teacher_steps={teacher_steps} must be >= the number of windows {k}")
    if schedule == "rectified" and teacher_steps % k == 0:
        m = teacher_steps // k
        return schedules.sigmas(int(teacher_steps), "rectified", shift), tuple(range(0, teacher_steps + 1, m))
    u = _unshift(np.asarray(boundaries, np.float64), shift)
    length = u[:-1] - u[1:]
    ideal = teacher_steps * length / length.sum()
    counts = np.maximum(np.floor(ideal).astype(int), 1)
    while counts.sum() < teacher_steps:
        counts[np.argmax(ideal - counts)] += 1
    while counts.sum() > teacher_steps:
        counts[np.argmax(np.where(counts > 1, counts - ideal, -np.inf))] -= 1
    pieces, index = [], [0]
    for i in range(k):
        uu = np.linspace(u[i], u[i + 1], counts[i] + 1)[:-1]
        piece = schedules.shift_sigmas(uu, shift).astype(np.float32)
        piece[0] = np.float32(boundaries[i])
        pieces.append(piece)
        index.append(index[-1] + int(counts[i]))
    grid = np.concatenate([*pieces, np.asarray(boundaries[-1:], np.float32)])
    return grid, tuple(index)


def teacher_velocity(
    model: Callable,
    cond: Mapping[str, jax.Array],
    uncond: Mapping[str, jax.Array],
    guidance: jax.Array,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """CFG velocity `(x, sigma) -> v` of an MMDiT-like `model(x, timestep, prompt_embeds, pooled)`."""
    return cfg_velocity(model_velocity(model, num_train_timesteps), cond, uncond, guidance)


def ota_states(velocity_fn: Callable, noise: jax.Array, grid: np.ndarray, boundary_index: tuple[int, ...]) -> jax.Array:
    """`(K + 1, B, ...)` teacher states at the boundaries of one trajectory from `noise` (index 0) to sigma 0."""
    _, states = euler(velocity_fn, noise, jnp.asarray(grid), keep=boundary_index)
    return jax.lax.stop_gradient(states)


def interpolate_segments(
    velocity_fn: Callable,
    x0: jax.Array,
    noise: jax.Array,
    grid: np.ndarray,
    boundary_index: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """PeRFlow: `(starts, ends)`, each `(K, B, ...)`; starts interpolate `x0` and `noise`, ends solve the window."""
    idx = boundary_index
    k = len(idx) - 1
    b = jnp.asarray(grid[list(idx)])
    shape = (k,) + (1,) * x0.ndim
    x0 = x0.astype(noise.dtype)
    starts = (1 - b[:-1]).reshape(shape) * x0[None] + b[:-1].reshape(shape) * noise[None]
    counts = {idx[i + 1] - idx[i] for i in range(k)}
    if len(counts) == 1:  # equal windows: one batched solve (vmap over windows), depth = steps per window
        sub = jnp.asarray(np.stack([grid[idx[i] : idx[i + 1] + 1] for i in range(k)]))
        ends = jax.vmap(lambda x, s: euler(velocity_fn, x, s))(starts, sub)
    else:
        ends = jnp.stack([euler(velocity_fn, starts[i], jnp.asarray(grid[idx[i] : idx[i + 1] + 1])) for i in range(k)])
    return jax.lax.stop_gradient(starts), jax.lax.stop_gradient(ends)
