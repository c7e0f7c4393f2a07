"""AutoencoderKL: parity against diffusers (encode, decode, SD3's scale/shift), round trips, strict errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion import vae as vae_conv
from conversion.safetensors_io import ConversionError
from flowsteer_jax.models.loading import load_vae, save_vae, vae_state_dict
from flowsteer_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from tests.torch_reference import randomize_, rel_err, to_np

# SD3's VAE in miniature: 16 latent channels, no quant convs, scale and shift; 3 levels, 2 resnets per level.
SD3_TINY = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 24),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The other branches: quant convs, no mid-block attention, no shift_factor (SD1/SDXL style), 4 latents.
OTHER_TINY = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=2,
    scaling_factor=0.18215,
    mid_block_add_attention=False,
)


def tiny_torch(config: dict, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    return randomize_(TorchAutoencoderKL(**config).eval(), seed)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("config,shard,hw", [(SD3_TINY, None, (24, 40)), (OTHER_TINY, "4KB", (16, 12))])
def test_parity_with_diffusers(tmp_path, config, shard, hw):
    ref = tiny_torch(config)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path)) == bool(shard)
    ours = load_vae(str(tmp_path))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, *hw)).astype(np.float32)
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        z = (post.mode() - shift) * scale  # what SD3 training/img2img feeds the transformer
        image = ref.decode(z / scale + shift).sample  # what StableDiffusion3Pipeline does with its latents

    def forward(graphdef, state, images, latents):
        vae = nnx.merge(graphdef, state)
        return vae.encode(images), vae.encode_latents(images), vae.decode_latents(latents)

    ours_post, ours_z, ours_image = jax.jit(forward)(*nnx.split(ours), nhwc(x), nhwc(to_np(z)))
    errs = {
        "mean": rel_err(ours_post.mean, nhwc(to_np(post.mean))),
        "logvar": rel_err(ours_post.logvar, nhwc(to_np(post.logvar))),
        "encode_latents": rel_err(ours_z, nhwc(to_np(z))),
        "decode_latents": rel_err(ours_image, nhwc(to_np(image))),
    }
    print(f"max relative error {max(errs.values()):.2e} {errs}")
    assert max(errs.values()) <= 1e-5, errs

    key = jax.random.key(0)  # a posterior sample is mean + std * N(0, 1) with our own noise
    eps = jax.random.normal(key, ours_post.mean.shape)
    sample = ours_post.mean + jnp.exp(0.5 * ours_post.logvar) * eps
    np.testing.assert_allclose(ours_post.sample(key), sample, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.encode_latents(nhwc(x), key), (sample - shift) * scale, rtol=1e-5, atol=1e-5)


def test_round_trip_is_bit_exact_and_loadable(tmp_path):
    ref = tiny_torch(SD3_TINY)
    ref.save_pretrained(tmp_path / "in")
    ours = load_vae(str(tmp_path / "in"))
    state = vae_state_dict(ours)
    ref_state = ref.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        assert state[k].dtype == np.float32 and np.array_equal(state[k], v.numpy()), k
    save_vae(ours, str(tmp_path / "out"), max_shard_bytes=4096)
    back = TorchAutoencoderKL.from_pretrained(tmp_path / "out")
    assert back.config.shift_factor == SD3_TINY["shift_factor"] and not back.config.use_quant_conv
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_bf16_checkpoint_loads_without_widening(tmp_path):
    ref = tiny_torch(SD3_TINY).to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="4KB")
    ours = load_vae(str(tmp_path), jnp.bfloat16)
    state = vae_state_dict(ours)
    for k, v in ref.state_dict().items():
        assert state[k].dtype == jnp.bfloat16 and np.array_equal(state[k].astype(np.float32), v.float().numpy()), k
    z = jax.jit(lambda g, s, a: nnx.merge(g, s).encode_latents(a))(*nnx.split(ours), jnp.zeros((1, 16, 16, 3)))
    assert z.dtype == jnp.bfloat16 and z.shape == (1, 4, 4, 16) and np.isfinite(np.asarray(z, np.float32)).all()


def _rewrite(folder, fn):
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})
    return path


def test_strict_errors_name_key_and_file(tmp_path):
    tiny_torch(SD3_TINY).save_pretrained(tmp_path)
    folder = str(tmp_path)
    key = "decoder.mid_block.attentions.0.to_q.weight"
    path = _rewrite(folder, lambda s: {("x." + k if k == key else k): v for k, v in s.items()})
    with pytest.raises(ConversionError) as e:
        load_vae(folder)
    assert f"unknown key 'x.{key}' in {path}" in str(e.value)
    assert f"missing key '{key}'" in str(e.value)
    conv = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    _rewrite(folder, lambda s: {k.removeprefix("x."): (v[:, :4] if k == conv else v) for k, v in s.items()})
    with pytest.raises(ConversionError, match=rf"shape mismatch for '{conv}' in {path}: file has \(16, 4, 1, 1\)"):
        load_vae(folder)


def test_bad_config_is_named(tmp_path):
    tiny_torch(SD3_TINY).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "latent_channelz": 16}))
    with pytest.raises(
        ConversionError, match=r"config.json: unknown AutoencoderKL config key\(s\) \['latent_channelz'\]"
    ):
        load_vae(str(tmp_path))
    cfg_path.write_text(json.dumps({**cfg, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"] * 2}))
    with pytest.raises(ConversionError, match="only 3 x DownEncoderBlock2D"):
        load_vae(str(tmp_path))
    with pytest.raises(ConversionError, match="act_fn='gelu'"):
        vae_conv.normalize_config({**SD3_TINY, "act_fn": "gelu"})


def test_table_matches_diffusers_and_model_for_sd3_vae():
    raw = dict(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**raw)
    table = vae_conv.param_table(raw)
    assert {e.torch_key: e.torch_shape for e in table} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig.from_diffusers(raw), rngs=nnx.Rngs(0)))
    flat = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
    assert flat == {e.flax_path: e.flax_shape for e in table}
