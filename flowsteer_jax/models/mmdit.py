"""SD3's MMDiT (diffusers `SD3Transformer2DModel`) as Flax NNX modules.

Module and attribute names mirror diffusers so `conversion/sd3_transformer.py` is a table. Tensors are
channels-last: `MMDiT(x_nhwc, timestep, encoder_hidden_states, pooled_projections) -> v_nhwc`, with
`timestep = sigma * 1000` and the velocity sign of diffusers (`v ~ eps - x0`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.sd3_transformer import DEFAULTS, normalize_config
from flowsteer_jax import parallel
from flowsteer_jax.models.attention import Attention
from flowsteer_jax.models.config import schema_dataclass
from flowsteer_jax.models.layers import AdaLayerNorm, Buffer, FeedForward, layer_norm, linear, modulate

# Names accepted by `remat_policy`: what each block keeps for the backward pass (None: no remat).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


@schema_dataclass(DEFAULTS)
class MMDiTConfig:
    """The fields of diffusers' SD3Transformer2DModel config.json, with its defaults.

    Fields and defaults: `conversion.sd3_transformer.DEFAULTS` (sample_size, patch_size, in_channels,
    num_layers, attention_head_dim, num_attention_heads, joint_attention_dim, caption_projection_dim,
    pooled_projection_dim, out_channels, pos_embed_max_size, dual_attention_layers, qk_norm).
    """

    def __post_init__(self):
        normalize_config(dataclasses.asdict(self), "MMDiTConfig")  # same validation as the converter

    @classmethod
    def from_diffusers(cls, raw: Mapping[str, Any], source: str = "config") -> MMDiTConfig:
        return cls(**normalize_config(raw, source))

    def to_diffusers(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3Transformer2DModel", **out}

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def sincos_pos_embed(dim: int, grid: int, base_size: int) -> jax.Array:
    """diffusers `get_2d_sincos_pos_embed(dim, grid, base_size=...)` -> (1, grid*grid, dim) float32.

    The table is separable (first half: column coordinate, second half: row coordinate), so the float64 sin/cos
    runs on `grid` values only and the full table is a broadcast: free under `nnx.eval_shape`.
    """
    coords = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(coords.astype(np.float64), omega)
    one_d = jnp.asarray(np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32))  # (grid, dim/2)
    cols = jnp.broadcast_to(one_d[None, :, :], (grid, grid, dim // 2))
    rows = jnp.broadcast_to(one_d[:, None, :], (grid, grid, dim // 2))
    return jnp.concatenate([cols, rows], axis=-1).reshape(1, grid * grid, dim)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class PatchEmbed(nnx.Module):
    """Patchify conv + the centre crop of SD3's `pos_embed_max_size` positional table."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        p, d = cfg.patch_size, cfg.inner_dim
        self.patch_size, self.max_size = p, cfg.pos_embed_max_size
        self.proj = nnx.Conv(
            cfg.in_channels,
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, None, None, "embed")},
            bias_metadata={"logical_axes": ("embed",)},
        )
        table = sincos_pos_embed(d, cfg.pos_embed_max_size, cfg.sample_size // p)
        self.pos_embed = Buffer(table.astype(param_dtype), logical_axes=(None, None, "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w = x.shape[0], x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"latent of {x.shape[1]}x{x.shape[2]} is {h}x{w} patches, more than pos_embed_max_size="
                f"{self.max_size} allows"
            )
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)[top : top + h, left : left + w]
        tokens = self.proj(x).reshape(b, h * w, -1)
        return (tokens + pos.reshape(1, h * w, -1)).astype(tokens.dtype)


class _TwoLayer(nnx.Module):
    """`linear_1 -> silu -> linear_2` (diffusers TimestepEmbedding / PixArtAlphaTextProjection with silu)."""

    def __init__(self, n_in: int, dim: int, **kw):
        self.linear_1 = linear(n_in, dim, (None, "embed"), **kw)
        self.linear_2 = linear(dim, dim, ("embed", None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    """diffusers `CombinedTimestepTextProjEmbeddings`."""

    def __init__(self, dim: int, pooled_dim: int, **kw):
        self.timestep_embedder = _TwoLayer(256, dim, **kw)
        self.text_embedder = _TwoLayer(pooled_dim, dim, **kw)

    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        t = self.timestep_embedder(timestep_embedding(timestep).astype(pooled.dtype))
        return t + self.text_embedder(pooled)


class JointTransformerBlock(nnx.Module):
    """diffusers `JointTransformerBlock`: adaLN-Zero modulated joint attention + FFN on both streams.

    `context_pre_only` (SD3's last block) updates only the image stream; `use_dual_attention` (MMDiT-X,
    SD3.5-Medium) adds a second, image-only self-attention `attn2` with its own 3 modulation chunks.
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
        *,
        context_pre_only: bool,
        use_dual_attention: bool,
        implementation: str | None,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
    ):
        d = cfg.inner_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(qk_norm=cfg.qk_norm, implementation=implementation, **kw)
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only, self.use_dual_attention = context_pre_only, use_dual_attention
        self.norm1 = AdaLayerNorm(d, 9 if use_dual_attention else 6, **kw)
        self.norm1_context = AdaLayerNorm(d, 2 if context_pre_only else 6, **kw)
        self.attn = Attention(d, heads, hd, joint=True, context_out=not context_pre_only, **attn_kw)
        self.attn2 = Attention(d, heads, hd, joint=False, **attn_kw) if use_dual_attention else None
        self.ff = FeedForward(d, **kw)
        self.ff_context = None if context_pre_only else FeedForward(d, **kw)

    def __call__(self, x: jax.Array, ctx: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x)
        if self.context_pre_only:
            scale_c, shift_c = self.norm1_context(temb)  # AdaLayerNormContinuous: scale first
            ctx_normed = modulate(layer_norm(ctx), shift_c, scale_c)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            ctx_normed = modulate(layer_norm(ctx), c_shift_msa, c_scale_msa)

        attn_out, ctx_attn_out = self.attn(modulate(normed, shift_msa, scale_msa), ctx_normed)
        x = x + gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2_out, _ = self.attn2(modulate(normed, shift_msa2, scale_msa2))
            x = x + gate_msa2[:, None] * attn2_out
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate_msa[:, None] * ctx_attn_out
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(ctx), c_shift_mlp, c_scale_mlp))
        return x, ctx


def check_remat_policy(remat_policy: str | None) -> None:
    if remat_policy is not None and remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} not in {[None, *REMAT_POLICIES]}")


def build_trunk(module: nnx.Module, cfg: MMDiTConfig, num_blocks: int, implementation: str | None, **kw) -> None:
    """Give `module` MMDiT's embedding layers and its first `num_blocks` joint blocks, under MMDiT's names.

    Shared by MMDiT and the discriminator, whose trunk must have the same paths so it copies path to path.
    """
    d = cfg.inner_dim
    module.pos_embed = PatchEmbed(cfg, **kw)
    module.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim, **kw)
    module.context_embedder = linear(cfg.joint_attention_dim, d, (None, "embed"), **kw)
    module.transformer_blocks = nnx.List(
        [
            JointTransformerBlock(
                cfg,
                context_pre_only=i == cfg.num_layers - 1,
                use_dual_attention=i in cfg.dual_attention_layers,
                implementation=implementation,
                **kw,
            )
            for i in range(num_blocks)
        ]
    )


def run_block(
    block: JointTransformerBlock,
    x: jax.Array,
    ctx: jax.Array,
    temb: jax.Array,
    remat_policy: str | None,
):
    """One joint block, under `jax.checkpoint` with the named policy when `remat_policy` is set.

    The block's token inputs are pinned to the batch axes (`parallel.constrain`, active in the trainer's
    programs): under FSDP the weights' `embed` dimension and the activations' batch share the `fsdp` mesh axis,
    and without the pin XLA may gather the activations (every device then holds the whole batch's temporaries)
    instead of the weights.
    """
    x, ctx = (parallel.constrain(t, ("batch", None, None)) for t in (x, ctx))
    if remat_policy is None:
        return block(x, ctx, temb)
    # Functional remat (split -> jax.checkpoint -> merge): nnx.remat writes Variables back, which fails when
    # the model is closed over inside another transform (lax.scan in OTA, the pipeline's loop).
    graphdef, state = nnx.split(block)
    call = jax.checkpoint(lambda s, *args: nnx.merge(graphdef, s)(*args), policy=REMAT_POLICIES[remat_policy])
    return call(state, x, ctx, temb)


def embed_inputs(model: nnx.Module, x, timestep, encoder_hidden_states, pooled_projections):
    """(image tokens, context tokens, conditioning vector) from a module with MMDiT's embedding layers."""
    x = x.astype(model.dtype)
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (x.shape[0],))
    return (
        model.pos_embed(x),
        model.context_embedder(encoder_hidden_states.astype(model.dtype)),
        model.time_text_embed(timestep, pooled_projections.astype(model.dtype)),
    )


class MMDiT(nnx.Module):
    """SD3 / SD3.5 MMDiT. `implementation` picks the attention kernel, `remat_policy` the per-block remat."""

    def __init__(
        self,
        cfg: MMDiTConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
        remat_policy: str | None = None,
    ):
        check_remat_policy(remat_policy)
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.inner_dim
        self.config, self.dtype, self.remat_policy = cfg, dtype, remat_policy
        self.implementation = implementation
        build_trunk(self, cfg, cfg.num_layers, implementation, **kw)
        self.norm_out = AdaLayerNorm(d, 2, **kw)
        p = cfg.patch_size
        self.proj_out = linear(d, p * p * cfg.out_channels, ("embed", None), **kw)

    def block_features(
        self,
        x: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        num_blocks: int,
    ) -> list[tuple[jax.Array, jax.Array | None]]:
        """(image tokens, context tokens) after each of the first `num_blocks` blocks; the rest never runs."""
        if not 1 <= num_blocks <= len(self.transformer_blocks):
            raise ValueError(f"num_blocks={num_blocks} must be in [1, {len(self.transformer_blocks)}]")
        h, ctx, temb = embed_inputs(self, x, timestep, encoder_hidden_states, pooled_projections)
        out = []
        for block in self.transformer_blocks[:num_blocks]:
            h, ctx = run_block(block, h, ctx, temb, self.remat_policy)
            out.append((h, ctx))
        return out

    def __call__(
        self,
        x: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
    ) -> jax.Array:
        """x: (B, H, W, C) latents; timestep: () or (B,) in [0, 1000]; returns the (B, H, W, C_out) velocity."""
        b, height, width, _ = x.shape
        h, ctx, temb = embed_inputs(self, x, timestep, encoder_hidden_states, pooled_projections)
        for block in self.transformer_blocks:
            h, ctx = run_block(block, h, ctx, temb, self.remat_policy)
        scale, shift = self.norm_out(temb)  # AdaLayerNormContinuous: scale first
        h = self.proj_out(modulate(layer_norm(h), shift, scale))
        p, c = self.config.patch_size, self.config.out_channels
        h = h.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, c)
