"""The one jitted FlowSteer train step: `(train_state, frozen, batch, rng) -> (train_state, metrics)`.

Pure `jax.jit` with explicit in/out shardings and the train state donated; `nnx.merge` happens inside.
Per step, for a batch of B prompts (docs/design.md, "The FlowSteer step"):

1. `key = fold_in(rng, step)`; noise `eps (B, H, W, C)` and guidance `w ~ U[cfg_min, cfg_max] (B,)`.
2. Teacher (the base with LoRA switched off, static) gives each of the K windows a start and an end:
   OTA (one CFG trajectory, one `lax.scan`) or PeRFlow interpolation (`distill.start_points`). No gradient.
3. One student forward over `K*B` points `z_t` (t uniform in each window, on its straight line) plus, with
   the discriminator and `adv.student_states="one_step"`, the `K*B` window starts (one batch of `2*K*B`,
   batch-major so every device keeps its own prompts' rows):
   `L_dist` over all windows, and `z^S = z^T_{s_k} + (s_{k-1} - s_k) v_S(z^T_{s_k}, s_k)`.
   `"rollout"` instead unrolls the student's own K steps from `eps` (Euler scan, remat per step).
4. One discriminator forward over `[z^T_{s_{k-1}}; z^S_{s_{k-1}}]` (`2*K*B`), its gradients split between
   the players (`losses.split_gradients`): the GAN loss's D part (`loss.gan`, hinge by default) trains D,
   `L_adv` and `L_FM` train the student.
5. One backward pass for `L_dist + l_adv L_adv + l_fm L_FM + L_D` gives LoRA and D gradients;
   `optax.partition` applies clipped AdamW per branch. With `lambda_adv = lambda_fm = 0` there is no
   discriminator in the state, so none in the compiled step.
6. With `ema.decay > 0`, `ema_update` moves `train_state["ema"]` towards the new LoRA.
7. A non-finite loss, gradient or updated parameter keeps params, optimizer state and EMA (a `lax.cond`, so no NaN
   reaches them); `step` still advances (fresh noise next time), `nonfinite` counts it, `metrics["finite"]` reports it.

Metrics: `loss` (`L_student + L_D`, what is differentiated), `loss_student`, `loss_dist`, `loss_adv`,
`loss_fm`, `loss_disc`, `d_real`, `d_fake`, `grad_norm_*`, `lr_*`, `finite`, `windows` (K * B trained).

Batch (all batch-major, sharded over the rules' `batch` axes): `prompt_embeds (B, S, J)`, `pooled (B, P)`,
`negative_prompt_embeds (B, S, J)`, `negative_pooled (B, P)` (CFG's unconditional branch), and for
`start_points="interpolate"` also `x0 (B, H, W, C)` (a teacher sample or data latent); B must divide by
the mesh's batch axes (`place_batch` puts a host batch there). `rng` is the run's base key
(`jax.random.PRNGKey(config.seed)`), replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from flowsteer_jax import parallel
from flowsteer_jax.distill import losses, ota
from flowsteer_jax.distill.config import uses_discriminator
from flowsteer_jax.distill.state import Graphs, make_optimizer, schedules
from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS, model_velocity, sample, timestep
from flowsteer_jax.models.lora import set_lora_enabled

STUDENT_STATES = ("one_step", "rollout")


def _batch_major(x: jax.Array) -> jax.Array:
    """`(K, B, ...)` per-window arrays -> `(B, K, ...)`."""
    return jnp.swapaxes(x, 0, 1)


def _groups(xs: list[jax.Array]) -> jax.Array:
    """`(B, K, ...)` arrays -> one `(B * len(xs) * K, ...)` batch, each prompt's rows together."""
    x = jnp.stack(xs, axis=1)
    return x.reshape(-1, *x.shape[3:])


def _repeat(tree, n: int):
    """Each row of every leaf `n` times in a row (`[c0, c0, ..., c1, c1, ...]`), matching `_groups`."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def ema_update(ema, lora, updates: jax.Array, decay: float, start_step: int):
    """The LoRA's moving average after optimizer update number `updates` (1-based) gave `lora`.

    Through `start_step` updates the average is the weights themselves (the early, fast-moving ones would
    otherwise linger in it); after, `decay * ema + (1 - decay) * lora`.
    """
    d = jnp.where(updates > start_step, jnp.float32(decay), jnp.float32(0.0))
    return jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, lora)


def build_train_step(
    config: ml_collections.ConfigDict,
    graphs: Graphs,
    latent_shape=None,
    *,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Callable:
    """The pure (un-jitted) step function; `make_step` jits it with shardings and donation.

    `num_train_timesteps`: the base model's scheduler's (sigma -> timestep, `flow.sampling`).
    """
    d, use_disc = config.distill, uses_discriminator(config)
    if d.start_points not in ota.START_POINTS:
        raise ValueError(f"distill.start_points {d.start_points!r} not in {ota.START_POINTS}")
    if config.adv.student_states not in STUDENT_STATES:
        raise ValueError(f"adv.student_states {config.adv.student_states!r} not in {STUDENT_STATES}")
    if use_disc != (graphs.disc is not None):
        raise ValueError("config's discriminator use (lambda_adv/lambda_fm) differs from the train state's")
    latent_shape = tuple(config.model.latent_shape if latent_shape is None else latent_shape)
    bounds = ota.window_boundaries(d.num_segments, d.schedule, d.shift)
    window_weights = losses.window_weights(
        jnp.asarray(bounds[:-1]), jnp.asarray(bounds[1:]), config.loss.window_weighting
    )
    grid, index = ota.teacher_grid(d.num_segments, int(d.teacher_steps), d.schedule, d.shift)
    k = int(d.num_segments)
    lam_adv, lam_fm = float(config.loss.lambda_adv), float(config.loss.lambda_fm)
    d_loss, g_loss = losses.GAN_LOSSES[config.loss.gan]
    rollout = config.adv.student_states == "rollout"
    optimizer = make_optimizer(config)
    lr_fns = schedules(config)
    ntt = int(num_train_timesteps)
    ema_decay, ema_start = float(config.ema.decay), int(config.ema.start_step)

    def model_fn(lora, base, enabled: bool):
        # Merge (copying the Variables) at the call site, so the Variables belong to whichever trace calls it
        # (`lax.scan` in OTA, `jax.checkpoint` in rollout) instead of being shared across traces.
        def call(x, timestep, ctx, pooled):
            model = nnx.merge(graphs.student, lora, base, copy=True)
            return set_lora_enabled(model, enabled)(x, timestep, ctx, pooled)

        return call

    def disc_forward(disc_params, x, t, ctx, pooled, buffers):
        return nnx.merge(graphs.disc, disc_params, buffers, copy=True)(x, t, ctx, pooled)

    def loss_fn(params, frozen, starts, ends, cond, noise, key):
        # Student and discriminator batches are laid out batch-major, `(B, groups, K, ...)` flattened: with the
        # batch sharded over devices each device then holds its own prompts' rows, and nothing moves between
        # devices (window-major `(K, B)` or concatenated groups would interleave devices' rows).
        s_hi, s_lo = jnp.asarray(bounds[:-1]), jnp.asarray(bounds[1:])
        b = noise.shape[0]
        student = model_fn(params["lora"], frozen["base"], True)
        v_star = losses.window_velocity(starts, ends, s_hi, s_lo)
        t, z_t = losses.window_points(key, starts, v_star, s_hi, s_lo)
        x_in, t_in = [_batch_major(z_t)], [_batch_major(t)]
        one_step = use_disc and not rollout
        if one_step:  # the window starts ride in the same student batch
            x_in.append(_batch_major(starts))
            t_in.append(jnp.broadcast_to(s_hi, (b, k)))
        x_in, t_in = _groups(x_in), _groups(t_in)
        c = _repeat(cond, x_in.shape[0] // b)
        v = model_velocity(student, ntt)(x_in, t_in, c).reshape(b, -1, k, *starts.shape[2:])
        aux = {"loss_dist": losses.velocity_loss(v[:, 0], _batch_major(v_star), window_weights)}
        total = aux["loss_dist"]
        if not use_disc:
            return total, aux
        if rollout:
            step_fn = jax.checkpoint(model_velocity(student, ntt))  # remat per Euler step
            _, fake = sample(step_fn, noise, jnp.asarray(bounds), cond, keep=tuple(range(1, k + 1)))
            fake = _batch_major(fake)
        else:
            step_size = losses._bcast(s_lo - s_hi, starts[0])  # (K, 1, ...) against (B, K, ...)
            fake = _batch_major(starts) + step_size * v[:, 1].astype(starts.dtype)
        real = _batch_major(ends)
        x_d = _groups([real, fake.astype(real.dtype)])
        sig = jnp.broadcast_to(s_lo, (b, 2, k)).reshape(-1)
        cd = _repeat(cond, 2 * k)
        (logit_d, _), (logit_g, feats_g) = losses.split_gradients(
            disc_forward, params["disc"], x_d, timestep(sig, ntt), cd["prompt_embeds"], cd["pooled"], frozen["disc"]
        )
        pairs = lambda x: x.reshape(b, 2, k, *x.shape[1:])  # noqa: E731  (real, fake) of each prompt and window
        logit_d, logit_g, feats_g = pairs(logit_d), pairs(logit_g), [pairs(f) for f in feats_g]
        aux["loss_disc"] = d_loss(logit_d[:, 0], logit_d[:, 1])
        aux["loss_adv"] = g_loss(logit_g[:, 1])
        aux["loss_fm"] = losses.feature_matching([f[:, 0] for f in feats_g], [f[:, 1] for f in feats_g])
        aux["d_real"], aux["d_fake"] = jnp.mean(logit_d[:, 0]), jnp.mean(logit_d[:, 1])
        aux["loss_student"] = total + lam_adv * aux["loss_adv"] + lam_fm * aux["loss_fm"]
        return aux["loss_student"] + aux["loss_disc"], aux

    def train_step(train_state, frozen, batch, rng):
        step = train_state["step"]
        k_noise, k_w, k_t = jax.random.split(jax.random.fold_in(rng, step), 3)
        cond = {"prompt_embeds": batch["prompt_embeds"], "pooled": batch["pooled"]}
        uncond = {"prompt_embeds": batch["negative_prompt_embeds"], "pooled": batch["negative_pooled"]}
        b = cond["pooled"].shape[0]
        noise = jax.random.normal(k_noise, (b, *latent_shape), jnp.float32)
        noise = parallel.constrain(noise, ("batch", None, None, None))
        w = jax.random.uniform(k_w, (b,), jnp.float32, d.cfg_min, d.cfg_max)
        params = train_state["params"]

        teacher = model_fn(jax.lax.stop_gradient(params["lora"]), frozen["base"], False)
        teacher_v = ota.teacher_velocity(teacher, cond, uncond, w, ntt)
        if d.start_points == "ota":
            states = ota.ota_states(teacher_v, noise, grid, index)
            starts, ends = states[:-1], states[1:]
        else:
            starts, ends = ota.interpolate_segments(teacher_v, batch["x0"], noise, grid, index)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, starts, ends, cond, noise, k_t)
        updates, opt_state = optimizer.update(grads, train_state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A finite gradient can still overflow the parameters (a huge learning rate): they are checked too.
        checked = jax.tree.leaves(grads) + jax.tree.leaves(new_params)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked]))
        # A cond, not an elementwise select: with `finite` depending on the updated parameters, XLA:CPU took 3.5x
        # longer to compile the selects (digits: 76 s vs 21 s for the first step); the cond compiles in 10 s.
        keep = lambda new, old: jax.lax.cond(finite, lambda: new, lambda: old)  # noqa: E731
        new_state = {
            "step": step + 1,
            "nonfinite": train_state["nonfinite"] + (~finite).astype(jnp.int32),
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, train_state["opt_state"]),
        }
        if "ema" in train_state:
            ema = ema_update(train_state["ema"], new_params["lora"], step + 1, ema_decay, ema_start)
            new_state["ema"] = keep(ema, train_state["ema"])
        metrics = {"loss": loss, "finite": finite.astype(jnp.float32), "windows": jnp.float32(k * b), **aux}
        for name, fn in lr_fns.items():
            metrics[f"grad_norm_{name}"] = optax.tree.norm(grads[name])
            metrics[f"lr_{name}"] = jnp.asarray(fn(step), jnp.float32)
        return new_state, {key: jnp.asarray(v, jnp.float32) for key, v in metrics.items()}

    return train_step


def make_step(
    config: ml_collections.ConfigDict,
    graphs: Graphs,
    latent_shape=None,
    *,
    donate: bool = True,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
):
    """`jax.jit(train_step)` with the state's and batch's shardings in and out, the train state donated."""
    fn = build_train_step(config, graphs, latent_shape, num_train_timesteps=num_train_timesteps)
    rep = parallel.replicated(graphs.mesh)
    return jax.jit(
        parallel.traced_on(graphs.mesh, fn, graphs.rules),
        in_shardings=(
            graphs.state_shardings,
            graphs.frozen_shardings,
            graphs.batch_sharding,
            rep,
        ),
        out_shardings=(graphs.state_shardings, rep),
        donate_argnums=(0,) if donate else (),
        compiler_options=parallel.compiler_options(graphs.mesh),
    )
