"""FlowSteer's losses (docs/design.md, "The FlowSteer step") as pure functions of arrays.

Shapes: per-window arrays are `(K, B, H, W, C)` with window k spanning `[s_hi[k], s_lo[k]]`
(`s_hi > s_lo`, noise side first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def window_velocity(starts: jax.Array, ends: jax.Array, s_hi: jax.Array, s_lo: jax.Array) -> jax.Array:
    """The constant target velocity of each window's straight line: `(end - start) / (s_lo - s_hi)`."""
    return (ends - starts) / _bcast(s_lo - s_hi, starts)


def window_points(
    key: jax.Array, starts: jax.Array, v_star: jax.Array, s_hi: jax.Array, s_lo: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(t, z_t)`: `t ~ U(s_lo, s_hi]` per window and sample, `z_t` on the window's straight line."""
    k, b = starts.shape[:2]
    u = jax.random.uniform(key, (k, b), jnp.float32)
    t = s_hi[:, None] - u * (s_hi - s_lo)[:, None]
    return t, starts + _bcast(t - s_hi[:, None], starts) * v_star


WINDOW_WEIGHTINGS = ("length", "uniform")


def window_weights(s_hi: jax.Array, s_lo: jax.Array, weighting: str) -> jax.Array:
    """`(K,)` weights of the windows in `velocity_loss`, averaging 1.

    "length": each window weighs by its length `s_hi - s_lo`, as the paper's loss (an integral over each window's
    time) does; "uniform": every window 1 (each window's one sampled `t` counts the same).
    """
    if weighting == "uniform":
        return jnp.ones_like(s_hi)
    if weighting != "length":
        raise ValueError(f"window weighting {weighting!r}: one of {WINDOW_WEIGHTINGS}")
    length = s_hi - s_lo
    return length * (length.shape[0] / jnp.sum(length))


def velocity_loss(v_pred: jax.Array, v_star: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Segment-wise velocity loss: the mean over samples and elements of `(v_S - v*)^2`, averaged over windows with
    `weights` (`(K,)`, averaging 1; None: uniform). Arrays are `(B, K, ...)`."""
    err = jnp.square(v_pred.astype(jnp.float32) - v_star.astype(jnp.float32))
    per_window = jnp.mean(err, axis=(0, *range(2, err.ndim)))
    return jnp.mean(per_window if weights is None else per_window * weights)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge: `E relu(1 - D(real)) + E relu(1 + D(fake))`."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def adversarial_loss(fake_logits: jax.Array) -> jax.Array:
    """Student's `L_adv = -E D(z^S)` (the paper's, with the hinge discriminator)."""
    return -jnp.mean(fake_logits)


def non_saturating_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Original GAN discriminator: `E softplus(-D(real)) + E softplus(D(fake))` (= BCE on sigmoid logits)."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def non_saturating_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss: `E softplus(-D(z^S))`."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def least_squares_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """LSGAN discriminator (targets 1 real, 0 fake): `E (D(real) - 1)^2 / 2 + E D(fake)^2 / 2`."""
    return 0.5 * (jnp.mean(jnp.square(real_logits - 1.0)) + jnp.mean(jnp.square(fake_logits)))


def least_squares_g_loss(fake_logits: jax.Array) -> jax.Array:
    """LSGAN generator: `E (D(z^S) - 1)^2 / 2`."""
    return 0.5 * jnp.mean(jnp.square(fake_logits - 1.0))


# `loss.gan` -> (discriminator loss of (real, fake) logits, the student's `L_adv` of fake logits). The paper uses
# hinge (Table 4 compares it with non-saturating and least squares).
GAN_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "hinge": (hinge_d_loss, adversarial_loss),
    "non_saturating": (non_saturating_d_loss, non_saturating_g_loss),
    "least_squares": (least_squares_d_loss, least_squares_g_loss),
}


def feature_matching(real_feats: Sequence[jax.Array], fake_feats: Sequence[jax.Array]) -> jax.Array:
    """`sum_l mean ||D_l(z^T) - D_l(z^S)||^2` over the discriminator's blocks (teacher side held fixed)."""
    total = jnp.zeros((), jnp.float32)
    for r, f in zip(real_feats, fake_feats, strict=True):
        diff = jax.lax.stop_gradient(r).astype(jnp.float32) - f.astype(jnp.float32)
        total = total + jnp.mean(jnp.square(diff))
    return total


def split_gradients(fn: Callable, params, x, *rest):
    """Run `fn(params, x, *rest)` once and return it twice: `(out_params, out_x)`.

    Cotangents reaching `out_params` flow to `params` only; those reaching `out_x` flow to `x` (and `rest`)
    only. This is how one forward of the discriminator serves both players in a single backward pass:
    the hinge loss reads `out_params` (trains D, does not push the student), `L_adv`/`L_FM` read `out_x`
    (push the student through D, do not train D). Equivalent to evaluating `fn(params, sg(x))` and
    `fn(sg(params), x)`, without the second forward.
    """

    @jax.custom_vjp
    def routed(params, x, rest):
        out = fn(params, x, *rest)
        return out, out

    def fwd(params, x, rest):
        out, vjp = jax.vjp(lambda p, y, r: fn(p, y, *r), params, x, rest)
        return (out, out), vjp

    def bwd(vjp, cts):
        ct_params, ct_x = cts
        g_params = vjp(ct_params)[0]
        _, g_x, g_rest = vjp(ct_x)
        return g_params, g_x, g_rest

    routed.defvjp(fwd, bwd)
    return routed(params, x, tuple(rest))
