"""FlowSteer distillation on a tiny random MMDiT: OTA, PeRFlow start points, losses, the jitted step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowsteer_jax.distill import default_config, losses, make_step, make_train_state, ota
from flowsteer_jax.flow.sampling import timestep
from flowsteer_jax.flow.schedules import sigmas
from flowsteer_jax.models.discriminator import Discriminator
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig

TINY = MMDiTConfig(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=8,
)
B, LATENT = 2, (8, 8, 4)


def tiny_config(**over):
    c = default_config()
    c.model.latent_shape = LATENT
    c.lora.rank, c.lora.alpha = 4, 4.0
    c.disc.num_blocks = 1
    c.distill.teacher_steps = 8
    c.optim.lora.lr = c.optim.disc.lr = 1e-3
    c.mesh.shape = (1, 1, 1)
    for key, value in over.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def make_batch(b=B, seed=0):
    r = np.random.default_rng(seed)
    arrays = dict(
        prompt_embeds=r.standard_normal((b, 5, 12)),
        pooled=r.standard_normal((b, 10)),
        negative_prompt_embeds=r.standard_normal((b, 5, 12)),
        negative_pooled=r.standard_normal((b, 10)),
        x0=r.standard_normal((b, *LATENT)),
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def single_device_state(config):
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    model = MMDiT(TINY, rngs=nnx.Rngs(0), remat_policy=config.model.remat_policy or None)
    return make_train_state(config, model, mesh=mesh)


# --- OTA and PeRFlow start points --------------------------------------------------------------------


def test_teacher_grid_contains_boundaries():
    for kind, n in (("rectified", 28), ("rectified", 10), ("diffusers", 28)):
        grid, idx = ota.teacher_grid(4, n, kind)
        assert len(grid) == n + 1 and idx[0] == 0 and idx[-1] == n and np.all(np.diff(grid) < 0)
        np.testing.assert_array_equal(grid[list(idx)], ota.window_boundaries(4, kind))
    grid, idx = ota.teacher_grid(4, 28)
    np.testing.assert_array_equal(grid, sigmas(28, "rectified"))  # K | N: exactly the rectified 28-step grid
    assert idx == (0, 7, 14, 21, 28)
    with pytest.raises(ValueError, match="teacher_steps"):
        ota.teacher_grid(4, 3)


def teacher_parts(seed=0):
    model = MMDiT(TINY, rngs=nnx.Rngs(seed))
    batch = make_batch()
    cond = {"prompt_embeds": batch["prompt_embeds"], "pooled": batch["pooled"]}
    uncond = {"prompt_embeds": batch["negative_prompt_embeds"], "pooled": batch["negative_pooled"]}
    noise = jax.random.normal(jax.random.PRNGKey(3), (B, *LATENT))
    w = jnp.asarray([7.5, 12.0])
    return model, batch, cond, uncond, noise, w


def loop_solve(model, cond, uncond, w, x, grid):
    """Plain Python Euler with CFG from two separate (cond / uncond) forwards per step."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda x, t, c, p: nnx.merge(graphdef, state)(x, t, c, p))
    out = [x]
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        t = jnp.full((x.shape[0],), s * 1000.0)
        v_c = fwd(x, t, cond["prompt_embeds"], cond["pooled"])
        v_u = fwd(x, t, uncond["prompt_embeds"], uncond["pooled"])
        x = x + (s_next - s) * (v_u + w[:, None, None, None] * (v_c - v_u))
        out.append(x)
    return out


def test_ota_states_equal_python_loop_euler():
    model, _, cond, uncond, noise, w = teacher_parts()
    grid, idx = ota.teacher_grid(4, 8)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, noise, w):
        v = ota.teacher_velocity(nnx.merge(graphdef, state), cond, uncond, w)
        return ota.ota_states(v, noise, grid, idx)

    states = run(state, noise, w)
    ref = loop_solve(model, cond, uncond, w, noise, grid)
    assert states.shape == (5, B, *LATENT)
    np.testing.assert_array_equal(states[0], noise)
    for i, j in enumerate(idx):
        np.testing.assert_allclose(states[i], ref[j], rtol=1e-5, atol=1e-5)


def test_interpolate_start_points_differ_from_ota_as_specified():
    model, batch, cond, uncond, noise, w = teacher_parts()
    grid, idx = ota.teacher_grid(4, 8)
    bounds = ota.window_boundaries(4)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x0, noise, w):
        v = ota.teacher_velocity(nnx.merge(graphdef, state), cond, uncond, w)
        return ota.ota_states(v, noise, grid, idx), ota.interpolate_segments(v, x0, noise, grid, idx)

    states, (starts, ends) = run(state, batch["x0"], noise, w)
    x0 = batch["x0"]
    for k in range(4):
        s = bounds[k]
        # PeRFlow: start on the straight line between x0 and noise, not on the teacher's trajectory ...
        np.testing.assert_allclose(starts[k], (1 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)
        # ... and the teacher solved inside the window only, from that start.
        ref = loop_solve(model, cond, uncond, w, starts[k], grid[idx[k] : idx[k + 1] + 1])[-1]
        np.testing.assert_allclose(ends[k], ref, rtol=1e-5, atol=1e-5)
    # Both start window 0 at pure noise, so its end is the same point; later windows start elsewhere.
    np.testing.assert_array_equal(starts[0], noise)
    np.testing.assert_allclose(ends[0], states[1], rtol=1e-5, atol=1e-5)
    for k in range(1, 4):
        assert np.abs(np.asarray(starts[k]) - np.asarray(states[k])).mean() > 0.1
    # OTA windows chain: window k starts exactly where window k - 1 ended.
    ota_starts, ota_ends = states[:-1], states[1:]
    np.testing.assert_array_equal(ota_starts[1:], ota_ends[:-1])


# --- Losses and the discriminator --------------------------------------------------------------------


def test_losses_and_window_points():
    r = np.random.default_rng(0)
    starts = jnp.asarray(r.standard_normal((4, 3, 2, 2, 1)), jnp.float32)
    ends = jnp.asarray(r.standard_normal((4, 3, 2, 2, 1)), jnp.float32)
    b = jnp.asarray(ota.window_boundaries(4))
    s_hi, s_lo = b[:-1], b[1:]
    v = losses.window_velocity(starts, ends, s_hi, s_lo)
    t, z = losses.window_points(jax.random.PRNGKey(0), starts, v, s_hi, s_lo)
    assert np.all((t <= s_hi[:, None]) & (t > s_lo[:, None]))
    frac = ((s_hi[:, None] - t) / (s_hi - s_lo)[:, None])[..., None, None, None]
    np.testing.assert_allclose(z, starts + frac * (ends - starts), rtol=1e-5, atol=1e-5)  # on the line
    real, fake = jnp.asarray([2.0, 0.5, -1.0]), jnp.asarray([-2.0, 0.0, 1.0])
    assert np.isclose(losses.hinge_d_loss(real, fake), (0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert np.isclose(losses.adversarial_loss(fake), 1.0 / 3)
    fm = losses.feature_matching([jnp.ones((2, 3)), jnp.zeros((2, 3))], [jnp.zeros((2, 3)), jnp.ones((2, 3))])
    assert np.isclose(fm, 2.0)


def test_gan_losses():
    """Each game's values on known logits, and its gradients push D(real) up, D(fake) down, the student's D up."""
    real, fake = jnp.asarray([2.0, 0.5, -1.0]), jnp.asarray([-2.0, 0.0, 1.0])
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
    want_d = {
        "hinge": (0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3,
        "non_saturating": np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))),
        "least_squares": 0.5 * (np.mean((np.asarray(real) - 1) ** 2) + np.mean(np.asarray(fake) ** 2)),
    }
    want_g = {"hinge": 1.0 / 3, "non_saturating": np.mean(sp(-np.asarray(fake))), "least_squares": 0.5 * 10 / 3}
    assert set(losses.GAN_LOSSES) == set(want_d)
    for name, (d_loss, g_loss) in losses.GAN_LOSSES.items():
        assert np.isclose(d_loss(real, fake), want_d[name], rtol=1e-6), name
        assert np.isclose(g_loss(fake), want_g[name], rtol=1e-6), name
        half = jnp.full(3, 0.5)
        g_real, g_fake = jax.grad(d_loss, argnums=(0, 1))(half, half)
        assert np.all(np.asarray(g_real) < 0) and np.all(np.asarray(g_fake) > 0), name
        assert np.all(np.asarray(jax.grad(g_loss)(half)) < 0), name


@pytest.mark.parametrize("gan", ["non_saturating", "least_squares"])
def test_train_step_with_other_gan_losses(gan):
    config = tiny_config(**{"loss.gan": gan})
    state, frozen, graphs = single_device_state(config)
    disc0 = host(state["params"]["disc"])
    hinge_state, _, _ = single_device_state(tiny_config())
    step, hinge_step = make_step(config, graphs), make_step(tiny_config(), graphs)
    rng, batch = jax.random.PRNGKey(0), make_batch()
    state, metrics = step(state, frozen, batch, rng)
    _, hinge_metrics = hinge_step(hinge_state, frozen, batch, rng)
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss_disc"]))
    assert float(metrics["loss_dist"]) == float(hinge_metrics["loss_dist"])  # same data, same student loss
    assert float(metrics["loss_disc"]) != float(hinge_metrics["loss_disc"])  # another game
    leaves = zip(jax.tree.leaves(state["params"]["disc"]), jax.tree.leaves(disc0), strict=True)
    assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in leaves) > 0


@pytest.mark.parametrize("trunk, heads", [("frozen", "final"), ("lora", "every")])
def test_discriminator_trunk_and_head_variants(trunk, heads):
    """Table 4's variants: a frozen trunk trains only its head; a LoRA trunk trains adapters + heads (the copied
    weights stay); heads on every block: one head per block, the logit their mean."""
    config = tiny_config(**{"disc.trunk": trunk, "disc.heads": heads, "disc.num_blocks": 2})
    state, frozen, graphs = single_device_state(config)
    trained = {p for p, _ in nnx.to_flat_state(state["params"]["disc"])}
    heads_n = {p[:2] for p in trained if p[0] == "block_heads"}
    assert len(heads_n) == (1 if heads == "every" else 0)
    if trunk == "frozen":
        assert all(p[0] in ("head", "block_heads") for p in trained)
    else:
        assert {p[-1] for p in trained if p[0] == "transformer_blocks"} == {"lora_a", "lora_b"}
    trunk0 = host(frozen["disc"])
    disc0 = host(state["params"]["disc"])
    step = make_step(config, graphs)
    state, metrics = step(state, frozen, make_batch(), jax.random.PRNGKey(0))
    assert float(metrics["finite"]) == 1.0
    for a, b in zip(jax.tree.leaves(frozen["disc"]), jax.tree.leaves(trunk0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # what does not train stays bit-identical
    moved = {
        p
        for (p, a), b in zip(nnx.to_flat_state(state["params"]["disc"]), jax.tree.leaves(disc0), strict=True)
        if np.abs(np.asarray(a.get_value()) - b).max() > 0
    }
    assert any(p[0] == "head" for p in moved)
    if trunk == "lora":
        assert any(p[-1] == "lora_b" for p in moved)
    if heads == "every":
        assert any(p[0] == "block_heads" for p in moved)
        disc = nnx.merge(graphs.disc, state["params"]["disc"], frozen["disc"])
        z, t = jnp.asarray(np.random.default_rng(0).standard_normal((B, *LATENT)), jnp.float32), jnp.full((B,), 500.0)
        batch = make_batch()
        logits, feats = disc(z, t, batch["prompt_embeds"], batch["pooled"])
        grid = (LATENT[0] // TINY.patch_size, LATENT[1] // TINY.patch_size)
        want = (disc.head(feats[-1], grid) + disc.block_heads[0](feats[0], grid)) / 2
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-6)


def test_split_gradients_route_each_player():
    fn = lambda p, x: jnp.tanh(p["w"] * x).sum() * p["c"]  # noqa: E731
    p, x = {"w": jnp.asarray(0.7), "c": jnp.asarray(1.3)}, jnp.asarray([0.3, -1.2, 2.0])

    def both(p, x):
        out_p, out_x = losses.split_gradients(fn, p, x)
        return 2.0 * out_p + 5.0 * out_x**2

    def reference(p, x):
        return 2.0 * fn(p, jax.lax.stop_gradient(x)) + 5.0 * fn(jax.lax.stop_gradient(p), x) ** 2

    got = jax.grad(both, argnums=(0, 1))(p, x)
    want = jax.grad(reference, argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.isclose(both(p, x), reference(p, x))


def test_discriminator_is_a_copy_of_the_first_blocks():
    model = MMDiT(TINY, rngs=nnx.Rngs(0))
    disc = Discriminator.from_mmdit(model, 1, rngs=nnx.Rngs(1))
    batch = make_batch()
    x = jax.random.normal(jax.random.PRNGKey(0), (B, *LATENT))
    sigma = jnp.asarray([0.9, 0.5])
    logits, feats = disc(x, timestep(sigma), batch["prompt_embeds"], batch["pooled"])
    ref = model.block_features(x, sigma * 1000, batch["prompt_embeds"], batch["pooled"], num_blocks=1)
    assert logits.shape == (B,) and len(feats) == 1
    np.testing.assert_array_equal(feats[0], ref[0][0])
    k_disc = disc.transformer_blocks[0].attn.to_q.kernel.get_value()
    k_model = model.transformer_blocks[0].attn.to_q.kernel.get_value()
    np.testing.assert_array_equal(k_disc, k_model)
    assert k_disc.unsafe_buffer_pointer() != k_model.unsafe_buffer_pointer()  # trainable copy, own buffer
    # Every block of the full model keeps its structure: block 1 is SD3's context_pre_only last block.
    assert Discriminator(TINY, 2, head="mlp", rngs=nnx.Rngs(0)).transformer_blocks[1].ff_context is None
    with pytest.raises(ValueError, match="num_blocks"):
        Discriminator(TINY, 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["cudnn", "splash", None])
def test_discriminator_uses_the_models_attention_kernel(attention):
    model = MMDiT(TINY, rngs=nnx.Rngs(0), implementation=attention)
    disc = Discriminator.from_mmdit(model, 2, rngs=nnx.Rngs(1))
    assert [blk.attn.implementation for blk in disc.transformer_blocks] == [attention] * 2


# --- The train step ----------------------------------------------------------------------------------


def test_train_steps_move_lora_and_disc_keep_base_and_skip_nonfinite():
    config = tiny_config(**{"ema.decay": 0.5, "ema.start_step": 1})
    state, frozen, graphs = single_device_state(config)
    base_before, lora0, disc0 = host(frozen["base"]), host(state["params"]["lora"]), host(state["params"]["disc"])
    step = make_step(config, graphs)
    rng, batch = jax.random.PRNGKey(config.seed), make_batch()
    seen, emas = [], []
    for _ in range(3):
        state, metrics = step(state, frozen, batch, rng)
        seen.append({k: float(v) for k, v in metrics.items()})
        emas.append((host(state["ema"]), host(state["params"]["lora"])))
    # The EMA of the LoRA: the weights through update ema.start_step = 1, then 0.5 * ema + 0.5 * weights.
    for e, p in zip(*map(jax.tree.leaves, emas[0]), strict=True):
        np.testing.assert_array_equal(e, p)
    for (ema, _), (ema_next, lora_next) in zip(emas, emas[1:], strict=False):
        for e, e_next, p in zip(*map(jax.tree.leaves, (ema, ema_next, lora_next)), strict=True):
            np.testing.assert_allclose(e_next, 0.5 * e + 0.5 * p, rtol=1e-6, atol=1e-8)
    assert any(np.abs(e - p).max() > 0 for e, p in zip(*map(jax.tree.leaves, emas[-1]), strict=True))
    for m in seen:
        for key in ("loss", "loss_dist", "loss_adv", "loss_fm", "loss_disc", "grad_norm_lora", "grad_norm_disc"):
            assert np.isfinite(m[key]), (key, m)
        assert m["finite"] == 1.0 and m["windows"] == 4 * B
    assert seen[0]["loss_dist"] != seen[1]["loss_dist"]  # fold_in(rng, step): fresh noise each step
    assert int(state["step"]) == 3 and int(state["nonfinite"]) == 0

    def moved(before, after):
        pairs = zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
        return max(float(np.abs(np.asarray(a) - b).max()) for a, b in pairs)

    assert moved(lora0, state["params"]["lora"]) > 0
    assert moved(disc0, state["params"]["disc"]) > 0
    flat_b = {p[:-1]: v for p, v in nnx.to_flat_state(state["params"]["lora"]) if p[-1] == "lora_b"}
    still_zero = {p for p, v in flat_b.items() if not np.abs(np.asarray(v.get_value())).max() > 0}
    # Every adapter learned, except the last block's context query: its output is dropped (context_pre_only).
    assert still_zero == {("transformer_blocks", 1, "attn", "add_q_proj")}, still_zero
    for a, b in zip(jax.tree.leaves(frozen["base"]), jax.tree.leaves(base_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the teacher weights are bit-identical

    # A NaN in the batch: parameters, optimizer state and EMA stay exactly as they were, the step is reported.
    before = host({"params": state["params"], "opt_state": state["opt_state"], "ema": state["ema"]})
    bad = dict(batch, pooled=batch["pooled"].at[0, 0].set(jnp.nan))
    state, metrics = step(state, frozen, bad, rng)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    assert int(state["nonfinite"]) == 1 and int(state["step"]) == 4
    after = {"params": state["params"], "opt_state": state["opt_state"], "ema": state["ema"]}
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = step(state, frozen, batch, rng)
    assert float(metrics["finite"]) == 1.0 and int(state["nonfinite"]) == 1


def lowered_step(config):
    state, frozen, graphs = single_device_state(config)
    lowered = make_step(config, graphs).lower(state, frozen, make_batch(), jax.random.PRNGKey(0))
    return state, lowered.as_text(), lowered.cost_analysis()["flops"]


def test_zero_adversarial_weights_remove_the_discriminator():
    head_kernel = "tensor<4x4x16x8xf32>"  # D's conv head (C=16 -> 8, 4x4): appears only with a discriminator
    state, text, flops = lowered_step(tiny_config(**{"loss.lambda_adv": 0.0, "loss.lambda_fm": 0.0}))
    assert set(state["params"]) == {"lora"} and head_kernel not in text
    assert "ema" not in state  # ema.decay = 0 (the default): no EMA in the state
    d_state, d_text, d_flops = lowered_step(tiny_config(**{"loss.lambda_adv": 0.0, "loss.lambda_fm": 1e-3}))
    assert set(d_state["params"]) == {"lora", "disc"} and head_kernel in d_text
    assert flops < 0.5 * d_flops, (flops, d_flops)


def test_rollout_students_with_interpolated_starts_and_remat():
    over = {"adv.student_states": "rollout", "distill.start_points": "interpolate", "model.remat_policy": "full"}
    config = tiny_config(**over)
    state, frozen, graphs = single_device_state(config)
    lora0 = host(state["params"]["lora"])
    step = make_step(config, graphs)
    for _ in range(2):
        state, metrics = step(state, frozen, make_batch(), jax.random.PRNGKey(1))
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["finite"]) == 1.0
    pairs = zip(jax.tree.leaves(state["params"]["lora"]), jax.tree.leaves(lora0), strict=True)
    diff = [np.abs(np.asarray(a) - b).max() for a, b in pairs]
    assert max(diff) > 0


def test_window_weighting_by_length():
    """The "length" weighting weighs each window's squared error by its length (the paper's integral over the
    window), scaled to average 1; "uniform" gives every window the same weight; the train step uses the configured
    one."""
    b = jnp.asarray(ota.window_boundaries(4, "rectified", 3.0))  # [1, 0.9, 0.75, 0.5, 0]: lengths .1 .15 .25 .5
    s_hi, s_lo = b[:-1], b[1:]
    w = losses.window_weights(s_hi, s_lo, "length")
    np.testing.assert_allclose(w, 4 * np.array([0.1, 0.15, 0.25, 0.5]), rtol=1e-5)
    np.testing.assert_allclose(losses.window_weights(s_hi, s_lo, "uniform"), np.ones(4))
    r = np.random.default_rng(0)
    pred, target = (jnp.asarray(r.standard_normal((3, 4, 2, 2, 1)), jnp.float32) for _ in range(2))
    per_window = np.mean(np.square(np.asarray(pred) - np.asarray(target)), axis=(0, 2, 3, 4))
    assert np.isclose(losses.velocity_loss(pred, target), per_window.mean(), rtol=1e-6)
    assert np.isclose(losses.velocity_loss(pred, target, w), np.mean(per_window * np.asarray(w)), rtol=1e-6)
    with pytest.raises(ValueError, match="window weighting"):
        losses.window_weights(s_hi, s_lo, "area")
    no_disc = {"loss.lambda_adv": 0.0, "loss.lambda_fm": 0.0}
    state, frozen, graphs = single_device_state(tiny_config(**no_disc))
    rng, batch = jax.random.PRNGKey(0), make_batch()
    uniform = make_step(tiny_config(**no_disc), graphs)(state, frozen, batch, rng)[1]
    state, frozen, graphs = single_device_state(tiny_config(**no_disc))
    config = tiny_config(**no_disc, **{"loss.window_weighting": "length"})
    length = make_step(config, graphs)(state, frozen, batch, rng)[1]
    assert np.isfinite(float(length["loss_dist"])) and float(length["loss_dist"]) != float(uniform["loss_dist"])


def test_ema_update_copies_through_start_step_then_averages():
    from flowsteer_jax.distill.step import ema_update

    ema = {"a": jnp.ones(3), "b": {"c": jnp.full((2,), 4.0, jnp.bfloat16)}}
    lora = {"a": jnp.zeros(3), "b": {"c": jnp.full((2,), 2.0, jnp.bfloat16)}}
    copied = ema_update(ema, lora, jnp.int32(2), 0.9, 2)  # update 2 of start_step 2: still the weights
    averaged = ema_update(ema, lora, jnp.int32(3), 0.9, 2)
    np.testing.assert_array_equal(copied["a"], 0.0)
    np.testing.assert_array_equal(np.float32(copied["b"]["c"]), 2.0)
    np.testing.assert_allclose(averaged["a"], 0.9)
    np.testing.assert_allclose(np.float32(averaged["b"]["c"]), 0.9 * 4 + 0.1 * 2, rtol=1e-2)
    assert averaged["b"]["c"].dtype == jnp.bfloat16
