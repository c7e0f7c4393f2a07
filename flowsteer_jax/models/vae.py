"""diffusers `AutoencoderKL` (as SD3 configures it) as Flax NNX modules, channels-last.

Attribute names mirror diffusers (`encoder.down_blocks.0.resnets.0.conv1`, `decoder.mid_block.attentions.0.to_q`)
so `conversion/vae.py` is a table. Images are NHWC in [-1, 1]; latents NHWC. The diffusion model sees
`z = (mean - shift_factor) * scaling_factor` (`encode_latents`), and `decode_latents` inverts it: both factors
come from the VAE's config.json (SD3: 1.5305 and 0.0609; a missing shift_factor is 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from conversion import vae as vae_table
from flowsteer_jax.models.attention import dot_product_attention
from flowsteer_jax.models.config import schema_dataclass
from flowsteer_jax.models.layers import linear


@schema_dataclass(vae_table.DEFAULTS)
class AutoencoderKLConfig:
    """The fields of diffusers' AutoencoderKL config.json, with its defaults.

    Fields and defaults: `conversion.vae.DEFAULTS` (in_channels, out_channels, down_block_types, up_block_types,
    block_out_channels, layers_per_block, act_fn, latent_channels, norm_num_groups, sample_size, scaling_factor,
    shift_factor, latents_mean, latents_std, force_upcast, use_quant_conv, use_post_quant_conv,
    mid_block_add_attention).
    """

    def __post_init__(self):
        vae_table.normalize_config(dataclasses.asdict(self), "AutoencoderKLConfig")

    @classmethod
    def from_diffusers(cls, raw: Mapping[str, Any], source: str = "config") -> AutoencoderKLConfig:
        cfg = vae_table.normalize_config(raw, source)
        if isinstance(cfg["sample_size"], list):
            cfg["sample_size"] = tuple(cfg["sample_size"])
        return cls(**cfg)

    def to_diffusers(self) -> dict[str, Any]:
        return vae_table.to_diffusers(dataclasses.asdict(self))


class DiagonalGaussian(NamedTuple):
    """diffusers' `DiagonalGaussianDistribution` (logvar already clipped to [-30, 20]), NHWC."""

    mean: jax.Array
    logvar: jax.Array

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * eps


def _conv(n_in: int, n_out: int, k: int = 3, *, stride: int = 1, padding=1, **kw) -> nnx.Conv:
    # Replicated: the VAE is small next to its activations, which are what a mesh should split.
    return nnx.Conv(
        n_in,
        n_out,
        (k, k),
        strides=(stride, stride),
        padding=padding,
        kernel_metadata={"logical_axes": (None, None, None, None)},
        bias_metadata={"logical_axes": (None,)},
        **kw,
    )


def _group_norm(n: int, groups: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nnx.GroupNorm:
    # Statistics in float32, two-pass like torch.
    return nnx.GroupNorm(
        n,
        num_groups=groups,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata={"logical_axes": (None,)},
        bias_metadata={"logical_axes": (None,)},
    )


class ResnetBlock2D(nnx.Module):
    """`norm1 -> silu -> conv1 -> norm2 -> silu -> conv2`, plus the input (through a 1x1 conv if widths differ)."""

    def __init__(self, n_in: int, n_out: int, groups: int, **kw):
        self.norm1 = _group_norm(n_in, groups, **kw)
        self.conv1 = _conv(n_in, n_out, **kw)
        self.norm2 = _group_norm(n_out, groups, **kw)
        self.conv2 = _conv(n_out, n_out, **kw)
        self.conv_shortcut = _conv(n_in, n_out, 1, padding=0, **kw) if n_in != n_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nnx.Module):
    """The mid-block's single-head spatial self-attention: GroupNorm, q/k/v over H*W tokens, residual."""

    def __init__(self, n: int, groups: int, **kw):
        self.group_norm = _group_norm(n, groups, **kw)
        self.to_q = linear(n, n, (None, None), **kw)
        self.to_k = linear(n, n, (None, None), **kw)
        self.to_v = linear(n, n, (None, None), **kw)
        self.to_out = nnx.List([linear(n, n, (None, None), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, 1, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # XLA's attention: one head of width C (512 in SD3) is beyond cuDNN's fused kernels.
        out = dot_product_attention(q, k, v)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
    def __init__(self, n: int, groups: int, add_attention: bool, **kw):
        self.resnets = nnx.List([ResnetBlock2D(n, n, groups, **kw), ResnetBlock2D(n, n, groups, **kw)])
        self.attentions = nnx.List([VAEAttention(n, groups, **kw) if add_attention else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nnx.Module):
    def __init__(self, n: int, **kw):
        self.conv = _conv(n, n, stride=2, padding=0, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # diffusers pads right/bottom only, then a VALID stride-2 conv.
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    def __init__(self, n: int, **kw):
        self.conv = _conv(n, n, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest-neighbour x2


class _Block(nnx.Module):
    """`DownEncoderBlock2D` (`downsamplers`) or `UpDecoderBlock2D` (`upsamplers`): resnets, then a resampler."""

    def __init__(self, n_in: int, n_out: int, layers: int, groups: int, resample: str | None, **kw):
        self.resnets = nnx.List([ResnetBlock2D(n_in if j == 0 else n_out, n_out, groups, **kw) for j in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(n_out, **kw)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(n_out, **kw)]) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for samplers in (self.downsamplers, self.upsamplers):
            for sampler in samplers or ():
                x = sampler(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, **kw):
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, chans[0], **kw)
        ins = (chans[0], *chans[:-1])
        last = len(chans) - 1
        self.down_blocks = nnx.List(
            [
                _Block(n_in, n, cfg.layers_per_block, groups, "down" if i < last else None, **kw)
                for i, (n_in, n) in enumerate(zip(ins, chans, strict=True))
            ]
        )
        self.mid_block = UNetMidBlock2D(chans[-1], groups, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = _group_norm(chans[-1], groups, **kw)
        self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, **kw):
        rev, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, rev[0], **kw)
        self.mid_block = UNetMidBlock2D(rev[0], groups, cfg.mid_block_add_attention, **kw)
        ins = (rev[0], *rev[:-1])
        last = len(rev) - 1
        self.up_blocks = nnx.List(
            [
                _Block(n_in, n, cfg.layers_per_block + 1, groups, "up" if i < last else None, **kw)
                for i, (n_in, n) in enumerate(zip(ins, rev, strict=True))
            ]
        )
        self.conv_norm_out = _group_norm(rev[-1], groups, **kw)
        self.conv_out = _conv(rev[-1], cfg.out_channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x` (raw latents), and the SD3-scaled pair
    `encode_latents(x, key=None) -> z`, `decode_latents(z) -> x`. All NHWC."""

    def __init__(
        self,
        cfg: AutoencoderKLConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
        self.config, self.dtype = cfg, dtype
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        n = cfg.latent_channels
        self.quant_conv = _conv(2 * n, 2 * n, 1, padding=0, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(n, n, 1, padding=0, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """(B, H, W, in_channels) images -> posterior over (B, H/f, W/f, latent_channels) raw latents."""
        h = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) raw latents -> (B, h*f, w*f, out_channels) images."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> the latents the diffusion model sees: the posterior mode (or a sample with `key`), scaled."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return (z - self.shift_factor) * self.config.scaling_factor

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion-model latents -> images (SD3 pipeline: `vae.decode(z / scaling_factor + shift_factor)`)."""
        return self.decode(z / self.config.scaling_factor + self.shift_factor)
