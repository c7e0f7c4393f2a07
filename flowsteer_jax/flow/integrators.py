"""Euler integration of a flow-matching velocity field, and classifier-free guidance.

Everything here is a pure function of arrays: jit it from the outside. Sigmas go to ``velocity_fn`` as they
are; `flow.sampling` turns a model into a velocity (sigma -> the model's timestep) and is what callers use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler(
    velocity_fn: VelocityFn,
    x: jax.Array,
    sigmas: jax.Array,
    *,
    keep: Sequence[int] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Integrate ``dx/dsigma = velocity_fn(x, sigma)`` along ``sigmas`` with one Euler step per interval.

    Args:
      velocity_fn: ``(x, sigma) -> v`` with ``sigma`` of shape ``(batch,)``.
      x: state at ``sigmas[0]``, batch-major.
      sigmas: 1-D, ``(n + 1,)``; may be traced (only its length must be static).
      keep: static indices into ``sigmas`` (0 is the input ``x``, n the result) whose states to return.

    Returns:
      ``x`` at ``sigmas[-1]``; with ``keep``, ``(x_final, states)`` where ``states`` has shape
      ``(len(keep), *x.shape)``.
    """
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sigmas.shape}")
    n = sigmas.shape[0] - 1
    batch = x.shape[0]

    if keep is not None:
        keep = tuple(int(i) for i in keep)
        bad = [i for i in keep if not 0 <= i <= n]
        if bad:
            raise ValueError(f"keep indices must lie in 0..{n} (len(sigmas) - 1), got {bad}")
    keep_idx = jnp.asarray(keep if keep else (), jnp.int32)
    # Broadcast a per-slot flag (len(keep),) over the state's axes.
    expand = (slice(None),) + (None,) * x.ndim

    def step(carry, inputs):
        x, kept = carry
        sigma, sigma_next, i = inputs
        v = velocity_fn(x, jnp.broadcast_to(sigma, (batch,)))
        # Compute in the promoted dtype, store in x's so the scan carry keeps its type.
        x = (x + (sigma_next - sigma) * v).astype(x.dtype)
        if keep is not None:
            # A select over the small kept buffer; cheap next to a model call and handles repeated indices.
            kept = jnp.where((keep_idx == i + 1)[expand], x[None], kept)
        return (x, kept), None

    kept0 = None
    if keep is not None:
        kept0 = jnp.where((keep_idx == 0)[expand], x[None], jnp.zeros((len(keep), *x.shape), x.dtype))
    xs = (sigmas[:-1], sigmas[1:], jnp.arange(n, dtype=jnp.int32))
    (x, kept), _ = jax.lax.scan(step, (x, kept0), xs)
    return x if keep is None else (x, kept)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[a_0, b_0, a_1, b_1, ...]` along the batch."""
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def cfg_velocity(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    uncond: Any,
    guidance: float | jax.Array,
) -> VelocityFn:
    """Classifier-free guided velocity ``v_uncond + w * (v_cond - v_uncond)`` with one model call per step.

    Args:
      model_fn: ``(x, sigma, cond_tree) -> v``; every leaf of ``cond_tree`` is batch-major.
      cond, uncond: conditioning pytrees of the same structure and batch as ``x``.
      guidance: ``w``, a python float or an array of shape ``()`` or ``(batch,)``. A python float ``<= 1``
        means no guidance, as in diffusers (``guidance_scale > 1`` enables CFG): the model runs on the
        conditional batch only and ``uncond`` is unused (may be None).
    """
    if isinstance(guidance, int | float) and guidance <= 1:

        def plain(x: jax.Array, sigma: jax.Array) -> jax.Array:
            return model_fn(x, sigma, cond)

        return plain

    def guided(x: jax.Array, sigma: jax.Array) -> jax.Array:
        # Each sample's unconditional and conditional rows side by side (batch-major), not diffusers' two halves:
        # with the batch sharded over devices every device keeps its own rows (stacking halves moves them).
        both = jax.tree.map(_interleave, uncond, cond)
        v = model_fn(_interleave(x, x), _interleave(sigma, sigma), both)
        v = v.reshape(x.shape[0], 2, *v.shape[1:])
        v_uncond, v_cond = v[:, 0], v[:, 1]
        w = jnp.asarray(guidance)
        w = w.reshape(w.shape + (1,) * (v_cond.ndim - w.ndim))
        return (v_uncond + w * (v_cond - v_uncond)).astype(v_cond.dtype)

    return guided
