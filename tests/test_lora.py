"""LoRA: paths unchanged, adapters split off as their own variable type, B = 0 student == teacher exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversion.safetensors_io import ConversionError
from conversion.sd3_transformer import linear_modules
from flowsteer_jax.models.lora import (
    LoRALinear,
    apply_lora,
    lora_layers,
    module_at,
    remove_lora,
    set_lora,
    set_lora_enabled,
    split_lora,
    unmatched_targets,
)
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig

TINY = MMDiTConfig(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


def inputs(b=2, seed=1):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((b, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((b, 5, 12)), jnp.float32)
    pool = jnp.asarray(r.standard_normal((b, 10)), jnp.float32)
    t = jnp.asarray(r.uniform(0, 1000, (b,)), jnp.float32)
    return x, t, ctx, pool


def forward(graphdef, *states, enabled=True):
    def f(args, *states):
        model = set_lora_enabled(nnx.merge(graphdef, *states), enabled)
        return model(*args)

    return jax.jit(f)(inputs(), *states)


def test_paths_unchanged_and_adapters_split():
    model = MMDiT(TINY, rngs=nnx.Rngs(0))
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    replaced = apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    # 3 blocks: block 0 has attn (8 projections) + attn2 (4) + 2 FFNs (4 linears); block 1: 8 + 4; last: 7 + 2.
    assert len(replaced) == 16 + 12 + 9
    assert "transformer_blocks.0.attn2.to_out.0" in replaced and "transformer_blocks.2.attn.to_add_out" not in replaced
    _, lora, base = split_lora(model)
    after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(base)}
    assert after.keys() == before.keys()
    for p in before:  # the same values at the same paths: nothing copied, nothing renamed
        assert np.array_equal(after[p], before[p]), p
    flat_lora = dict(nnx.to_flat_state(lora))
    assert len(flat_lora) == 2 * len(replaced)
    a = flat_lora[("transformer_blocks", 1, "attn", "to_q", "lora_a")]
    b = flat_lora[("transformer_blocks", 1, "attn", "to_q", "lora_b")]
    assert isinstance(a, nnx.LoRAParam) and a.shape == (16, 4) and b.shape == (4, 16)
    assert a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert b.get_metadata()["logical_axes"] == ("lora_rank", "heads")
    assert not np.any(np.asarray(b.get_value()))
    assert isinstance(model.transformer_blocks[0].ff.net[2], LoRALinear)
    # The adapted layer still holds the very same kernel Variable the conversion table addresses.
    assert model.transformer_blocks[1].attn.to_q.kernel.shape == (16, 16)


def test_zero_b_student_equals_teacher_exactly_and_off_skips_lora():
    plain = MMDiT(TINY, rngs=nnx.Rngs(0))
    g_plain, s_plain = nnx.split(plain)
    ref = forward(g_plain, s_plain)
    model = MMDiT(TINY, rngs=nnx.Rngs(0))
    apply_lora(model, rank=4, alpha=4.0, rngs=nnx.Rngs(1))
    graphdef, lora, base = split_lora(model)
    student = forward(graphdef, lora, base, enabled=True)
    teacher = forward(graphdef, lora, base, enabled=False)
    np.testing.assert_array_equal(np.asarray(teacher), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(student), np.asarray(ref))

    # Non-zero B changes the student only; the teacher view of the same weights is untouched.
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    student = forward(graphdef, lora, base, enabled=True)
    teacher = forward(graphdef, lora, base, enabled=False)
    np.testing.assert_array_equal(np.asarray(teacher), np.asarray(ref))
    assert np.abs(np.asarray(student) - np.asarray(ref)).max() > 1e-3

    # "Off" is static: the teacher graph has exactly the plain model's matmuls, no LoRA ones.
    def n_dots(graphdef, *states, enabled=True):
        def f(*states):
            return set_lora_enabled(nnx.merge(graphdef, *states), enabled)(*inputs())

        return str(jax.make_jaxpr(f)(*states)).count("dot_general")

    assert n_dots(graphdef, lora, base, enabled=False) == n_dots(g_plain, s_plain)
    assert n_dots(graphdef, lora, base, enabled=True) == n_dots(g_plain, s_plain) + 2 * 37


def test_lora_scale_and_gradient_only_to_adapters():
    layer = nnx.Linear(6, 5, rngs=nnx.Rngs(0), kernel_metadata={"logical_axes": ("embed", "mlp")})

    class Holder(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([layer])

    holder = Holder()
    apply_lora(holder, rank=2, alpha=6.0, targets=("0",), scope=r"blocks\.\d+", rngs=nnx.Rngs(2))
    lin = holder.blocks[0]
    assert lin.lora_scale == 3.0
    lin.lora_b.set_value(jnp.ones((2, 5)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)), jnp.float32)
    want = x @ lin.kernel[...] + lin.bias[...] + 3.0 * (x @ lin.lora_a[...]) @ lin.lora_b[...]
    np.testing.assert_allclose(lin(x), want, rtol=1e-6, atol=1e-6)

    graphdef, lora, base = split_lora(holder)
    grads = jax.grad(lambda lo: jnp.sum(nnx.merge(graphdef, lo, base).blocks[0](x) ** 2))(lora)
    assert set(dict(nnx.to_flat_state(grads))) == {("blocks", 0, "lora_a"), ("blocks", 0, "lora_b")}

    with pytest.raises(ValueError, match="match no nnx.Linear"):
        apply_lora(MMDiT(TINY, rngs=nnx.Rngs(0)), rank=2, alpha=2.0, targets=("to_qq",), rngs=nnx.Rngs(0))


def test_set_lora_replaces_all_adapters_and_remove_lora_restores_plain_linears():
    model = MMDiT(TINY, rngs=nnx.Rngs(0))
    ref = nnx.merge(*nnx.split(model))(*inputs())
    kernel = module_at(model, "transformer_blocks.1.attn.to_q").kernel
    apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    r = np.random.default_rng(0)
    pairs = {
        "transformer_blocks.1.attn.to_q": (r.standard_normal((16, 3)), r.standard_normal((3, 16))),
        "transformer_blocks.0.ff.net.2": (r.standard_normal((64, 2)), r.standard_normal((2, 16))),
    }
    assert set_lora(model, pairs, 0.5) == sorted(pairs)
    assert len(lora_layers(model)) == 2  # the 37 trained adapters are gone, not stacked
    layer = module_at(model, "transformer_blocks.1.attn.to_q")
    assert isinstance(layer, LoRALinear) and layer.lora_rank == 3 and layer.lora_scale == 0.5
    assert layer.kernel is kernel  # same Variable: no copy of the base weights
    np.testing.assert_array_equal(layer.lora_b[...], np.float32(pairs["transformer_blocks.1.attn.to_q"][1]))

    def adapters():
        return {n: (np.asarray(module_at(model, n).lora_a[...]), module_at(model, n).lora_scale) for n in pairs}

    before = adapters()
    with pytest.raises(ConversionError, match="pos_embed.proj.*not an nnx.Linear"):
        set_lora(model, {**pairs, "pos_embed.proj": pairs["transformer_blocks.1.attn.to_q"]}, 1.0)
    with pytest.raises(ConversionError, match="no_such.*not an nnx.Linear"):
        set_lora(model, {"transformer_blocks.0.no_such": pairs["transformer_blocks.1.attn.to_q"]}, 1.0)
    after = adapters()
    assert len(lora_layers(model)) == 2  # a bad target changes nothing
    for name in before:
        np.testing.assert_array_equal(after[name][0], before[name][0])
        assert after[name][1] == before[name][1]

    assert remove_lora(model) == sorted(pairs)
    assert not lora_layers(model)
    plain = module_at(model, "transformer_blocks.1.attn.to_q")
    assert type(plain) is nnx.Linear and plain.kernel is kernel
    np.testing.assert_array_equal(np.asarray(nnx.merge(*nnx.split(model))(*inputs())), np.asarray(ref))


def test_linear_modules_from_config_are_the_models_linears():
    """The name-only LoRA check (`validate_model`, before any model loads) sees exactly the Linears `apply_lora`
    sees: `linear_modules(config.json)` equals the built model's `nnx.Linear` paths (dual attention, qk norm)."""
    model = nnx.eval_shape(lambda: MMDiT(TINY, rngs=nnx.Rngs(0)))
    built = sorted(".".join(map(str, p)) for p, m in nnx.iter_modules(model) if type(m) is nnx.Linear)
    assert sorted(linear_modules(TINY.to_diffusers())) == built
    assert unmatched_targets(built, ("to_q", "attn2.to_q", "net.2", "to_qq", "norm_out.linear")) == [
        "to_qq",
        "norm_out.linear",  # outside the transformer blocks (DEFAULT_SCOPE)
    ]
