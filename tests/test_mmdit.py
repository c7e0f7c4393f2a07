"""MMDiT parity against diffusers' SD3Transformer2DModel, conversion round trips and strict errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx

from conversion.safetensors_io import ConversionError, open_checkpoint
from conversion.sd3_transformer import param_table
from flowsteer_jax.models.loading import load_transformer, save_transformer, transformer_state_dict
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig, sincos_pos_embed
from tests.torch_reference import randomize_, rel_err, to_np

TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=16,
)


def tiny_torch(qk_norm=None, dual=(), seed=0, **over) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY, **over}, qk_norm=qk_norm, dual_attention_layers=dual)
    return randomize_(model.eval(), seed)


def inputs(b=2, h=16, w=16, c=4, seq=7, joint=24, pooled=20, seed=1):
    r = np.random.default_rng(seed)
    x = r.standard_normal((b, c, h, w)).astype(np.float32)
    ctx = r.standard_normal((b, seq, joint)).astype(np.float32)
    pool = r.standard_normal((b, pooled)).astype(np.float32)
    t = r.uniform(0, 1000, (b,)).astype(np.float32)
    return x, t, ctx, pool


def torch_forward(model, x, t, ctx, pool) -> np.ndarray:
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pool),
        ).sample
    return to_np(out)


def jax_forward(model, x, t, ctx, pool) -> np.ndarray:
    out = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, pool)
    return np.asarray(out).transpose(0, 3, 1, 2)


CASES = [
    # (qk_norm, dual_attention_layers, latent (h, w), shard size)
    (None, (), (16, 16), None),
    ("rms_norm", (), (12, 20), "2KB"),
    (None, (0, 1), (20, 12), None),
    ("rms_norm", (0, 1), (16, 16), "2KB"),
    ("rms_norm", (0,), (8, 32), "2KB"),
]


@pytest.mark.parametrize("qk_norm,dual,hw,shard", CASES)
def test_parity_with_diffusers(tmp_path, qk_norm, dual, hw, shard):
    ref = tiny_torch(qk_norm, dual, pos_embed_max_size=16 if hw != (8, 32) else 16)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path)) == bool(shard)
    ours = load_transformer(str(tmp_path), jnp.float32)
    args = inputs(h=hw[0], w=hw[1])
    err = rel_err(jax_forward(ours, *args), torch_forward(ref, *args))
    print(f"max relative error {err:.2e}")
    assert err <= 1e-5, err


def test_block_features_match_diffusers_blocks(tmp_path):
    ref = tiny_torch("rms_norm", (0,))
    ref.save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path))
    x, t, ctx, pool = inputs(h=12, w=16)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in ref.transformer_blocks[:2]]
    torch_forward(ref, x, t, ctx, pool)
    for h in hooks:
        h.remove()
    feats = ours.block_features(jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, pool, num_blocks=2)
    assert len(feats) == 2
    for (img, txt), (ref_txt, ref_img) in zip(feats, seen, strict=True):
        assert rel_err(img, to_np(ref_img)) <= 1e-5
        assert rel_err(txt, to_np(ref_txt)) <= 1e-5
    with pytest.raises(ValueError, match="num_blocks"):
        ours.block_features(jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, pool, num_blocks=4)


def test_remat_policies_change_nothing_numerically(tmp_path):
    tiny_torch("rms_norm", (0,)).save_pretrained(tmp_path)
    x, t, ctx, pool = inputs()
    x = jnp.asarray(x.transpose(0, 2, 3, 1))

    def loss_and_grad(policy):
        model = load_transformer(str(tmp_path), remat_policy=policy)
        graphdef, params = nnx.split(model)
        f = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, ctx, pool) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    base_loss, base_grad = loss_and_grad(None)
    for policy in ("full", "dots"):
        loss, grad = loss_and_grad(policy)
        assert np.allclose(loss, base_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="remat_policy"):
        load_transformer(str(tmp_path), remat_policy="everything")


def test_round_trip_is_bit_exact_and_strict_loadable(tmp_path):
    ref = tiny_torch("rms_norm", (0, 1))
    ref.save_pretrained(tmp_path / "in", max_shard_size="2KB")
    ours = load_transformer(str(tmp_path / "in"))
    state = transformer_state_dict(ours)
    ref_state = ref.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        assert state[k].dtype == np.float32 and np.array_equal(state[k], v.numpy()), k
    fresh = SD3Transformer2DModel(**{**TINY, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)})
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)

    save_transformer(ours, str(tmp_path / "out"), max_shard_bytes=4096)
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "out")
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


@pytest.mark.parametrize("torch_dtype,jnp_dtype", [(torch.bfloat16, jnp.bfloat16), (torch.float16, jnp.float16)])
def test_half_precision_checkpoints_load_without_widening(tmp_path, torch_dtype, jnp_dtype):
    ref = tiny_torch("rms_norm").to(torch_dtype)
    ref.save_pretrained(tmp_path, max_shard_size="4KB")
    ours = load_transformer(str(tmp_path), jnp_dtype)
    state = transformer_state_dict(ours)
    for k, v in ref.state_dict().items():
        assert state[k].dtype == jnp_dtype, k
        assert np.array_equal(state[k].astype(np.float32), v.float().numpy()), k
    if jnp_dtype == jnp.bfloat16:  # XLA:CPU has no fp16 dot with fp32 accumulation; bf16 it runs
        out = jax_forward(ours, *inputs())
        assert out.dtype == jnp_dtype and np.isfinite(out.astype(np.float32)).all()


def test_table_matches_model_and_diffusers_for_real_configs():
    """The key table equals diffusers' state dict and our module tree for SD3-M / SD3.5-L / SD3.5-M shapes."""
    configs = {
        "sd3_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
        "sd3_5_large": dict(
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            qk_norm="rms_norm",
            pos_embed_max_size=192,
        ),
        "sd3_5_medium": dict(
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
            pos_embed_max_size=384,
        ),
    }
    for name, over in configs.items():
        raw = {"sample_size": 128, "joint_attention_dim": 4096, "pooled_projection_dim": 2048, **over}
        with torch.device("meta"):
            ref = SD3Transformer2DModel(**raw)
        table = param_table(raw)
        assert {e.torch_key: e.torch_shape for e in table} == {
            k: tuple(v.shape) for k, v in ref.state_dict().items()
        }, name
        if name == "sd3_5_medium":  # the richest layout; tracing the others' module trees only costs CI time
            model = nnx.eval_shape(lambda raw=raw: MMDiT(MMDiTConfig.from_diffusers(raw), rngs=nnx.Rngs(0)))
            flat = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
            assert flat == {e.flax_path: e.flax_shape for e in table}, name


def test_computed_pos_embed_equals_diffusers_buffer():
    ref = SD3Transformer2DModel(**TINY)
    ours = sincos_pos_embed(32, 16, TINY["sample_size"] // 2)
    assert ours.shape == (1, 256, 32)
    assert np.array_equal(np.asarray(ours), to_np(ref.pos_embed.pos_embed))


def test_latent_larger_than_pos_table_is_refused(tmp_path):
    tiny_torch().save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(jnp.zeros((1, 34, 16, 4)), 0.0, jnp.zeros((1, 7, 24)), jnp.zeros((1, 20)))


def _mutate(folder, fn):
    """Rewrite the single safetensors file of `folder` through fn(dict) -> dict."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})
    return path


def test_strict_errors_name_key_and_file(tmp_path):
    tiny_torch().save_pretrained(tmp_path)
    folder = str(tmp_path)
    key = "transformer_blocks.1.attn.to_q.weight"

    path = _mutate(folder, lambda s: {("x." + k if k == key else k): v for k, v in s.items()})
    with pytest.raises(ConversionError) as e:
        load_transformer(folder)
    assert f"unknown key 'x.{key}' in {path}" in str(e.value)
    assert f"missing key '{key}'" in str(e.value)

    _mutate(folder, lambda s: {("x." + k if k == "x." + key else k).removeprefix("x."): v for k, v in s.items()})
    _mutate(folder, lambda s: {k: v for k, v in s.items() if k != "proj_out.bias"})
    with pytest.raises(ConversionError, match="missing key 'proj_out.bias'"):
        load_transformer(folder)

    tiny_torch().save_pretrained(tmp_path)
    _mutate(folder, lambda s: {**s, key: np.zeros((3, 32), np.float32)})
    with pytest.raises(ConversionError) as e:
        load_transformer(folder)
    assert f"shape mismatch for '{key}' in {path}: file has (3, 32)" in str(e.value)
    assert "config.json implies (32, 32)" in str(e.value)


def test_sharded_checkpoint_errors(tmp_path):
    tiny_torch().save_pretrained(tmp_path, max_shard_size="2KB")
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # the same key in two shards
    from safetensors.numpy import load_file, save_file

    first, second = (str(tmp_path / s) for s in shards[:2])
    a, b = load_file(first), load_file(second)
    dup = next(iter(a))
    save_file({**b, dup: a[dup]}, second, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"duplicate key '{dup}' in .*{shards[0]} and .*{shards[1]}"):
        open_checkpoint(str(tmp_path))
    # a shard named in the index that does not exist
    os.remove(second)
    with pytest.raises(ConversionError, match=f"names shard file.*{shards[1]}"):
        load_transformer(str(tmp_path))


def test_bad_config_is_named(tmp_path):
    tiny_torch().save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "num_layerz": 3}))
    with pytest.raises(
        ConversionError, match=r"config.json: unknown SD3Transformer2DModel config key\(s\) \['num_layerz'\]"
    ):
        load_transformer(str(tmp_path))
    os.remove(cfg_path)
    with pytest.raises(ConversionError, match="config.json: cannot read"):
        load_transformer(str(tmp_path))


_SHARDED_LOAD = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from flowsteer_jax.models.loading import load_transformer
from flowsteer_jax.parallel import make_mesh
folder, out = sys.argv[1], sys.argv[2]
mesh = make_mesh((2, 2, 2))
with jax.set_mesh(mesh):  # the "active mesh" path; load_transformer(mesh=...) is the explicit one
    model = load_transformer(folder)
q = model.transformer_blocks[0].attn.to_q.kernel[...]
ff = model.transformer_blocks[0].ff.net[2].kernel[...]
assert len(jax.devices()) == 8
assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), q.sharding
assert ff.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), ff.sharding
assert q.addressable_shards[0].data.shape == (16, 16), q.addressable_shards[0].data.shape
x, t, ctx, pool = (np.load(f"{folder}/inputs.npz")[k] for k in ("x", "t", "ctx", "pool"))
y = jax.jit(lambda m, *a: m(*a))(model, jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, pool)
np.save(out, np.asarray(y).transpose(0, 3, 1, 2))
"""


def test_loading_places_weights_into_mesh_shardings(tmp_path):
    """8 fake CPU devices in a subprocess: weights land split over ('fsdp', 'tensor') and outputs still match."""
    import subprocess
    import sys

    ref = tiny_torch("rms_norm", (0,))
    ref.save_pretrained(tmp_path)
    x, t, ctx, pool = inputs(b=4)
    np.savez(tmp_path / "inputs.npz", x=x, t=t, ctx=ctx, pool=pool)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_LOAD, str(tmp_path), str(tmp_path / "out.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rel_err(np.load(tmp_path / "out.npy"), torch_forward(ref, x, t, ctx, pool)) <= 1e-5


def test_remat_inside_scan_closure():
    """A remat model closed over by lax.scan (as OTA and the pipeline do) must trace and match the plain one."""
    cfg = MMDiTConfig(**{**TINY, "num_layers": 2})
    plain = MMDiT(cfg, rngs=nnx.Rngs(0))
    remat = MMDiT(cfg, rngs=nnx.Rngs(0), remat_policy="full")
    x, t, ctx, pool = inputs()
    x = jnp.asarray(x.transpose(0, 2, 3, 1))

    def loop(model):
        def body(h, _):
            return model(h, t, ctx, pool), None

        return jax.jit(lambda h: jax.lax.scan(body, h, None, length=2)[0])(x)

    np.testing.assert_allclose(loop(remat), loop(plain), rtol=1e-6, atol=1e-6)


def test_model_configs_take_their_fields_from_the_conversion_schemas():
    import dataclasses

    from conversion import clip, sd3_transformer, t5, vae
    from flowsteer_jax.models.config import schema_dataclass
    from flowsteer_jax.models.text.clip import CLIPTextConfig
    from flowsteer_jax.models.text.t5 import T5Config
    from flowsteer_jax.models.vae import AutoencoderKLConfig

    for cls, defaults in [
        (MMDiTConfig, sd3_transformer.DEFAULTS),
        (AutoencoderKLConfig, vae.DEFAULTS),
        (CLIPTextConfig, {**clip.DEFAULTS, "architecture": clip.ARCHITECTURES[0]}),
        (T5Config, t5.DEFAULTS),
    ]:
        assert [(f.name, f.default) for f in dataclasses.fields(cls)] == list(defaults.items()), cls
        assert cls.__module__.startswith("flowsteer_jax.models") and cls() == cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().vocab_size = 1
    with pytest.raises(TypeError, match="come from the schema"):

        @schema_dataclass({"a": 1})
        class Bad:
            b: int = 2
