"""FlowSteer's discriminator: the pretrained MMDiT's first `num_blocks` blocks (fully trainable) + one head.

`D(z_sigma, timestep(sigma), prompt_embeds, pooled) -> (logits (B,), features)`: the trunk is an exact copy of the
teacher's embedders and blocks `0 .. num_blocks-1` (same structure flags as in the full model, so block 11 of
SD3-Medium keeps its context stream), conditioned on sigma and text the way the MMDiT is; `features` are the
image tokens after every block (for feature matching); the head reads the last block's image tokens.

Head (`head="conv"`, the default) — FastGen's `Discriminator_ImageDiT` head (docs/design.md, "The FlowSteer step"):
tokens reshaped to the latent patch grid, `Conv 4x4 stride 2 (C -> C/2) -> GroupNorm -> LeakyReLU(0.2) ->
Conv 1x1 (-> 1)`, then the mean over positions. Why: the paper puts a single head on the final block
(Table 4) and compares trajectory states *locally*; a spatial head keeps the patch layout the tokens came
from (a patch-GAN over the grid, any resolution or aspect), while SwD's token-mean MLP (`head="mlp"`, also
available) averages the tokens away before judging. Unlike SANA-Sprint's StyleGAN-T head it has no batch
statistics (BatchNormLocal), so one sample's logit never depends on the others: the loss is the same on any
mesh and under any batch split. The trunk already conditions on sigma and text (adaLN, joint attention),
so the head is unconditional, as in SANA-Sprint and FastGen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flowsteer_jax.models.layers import linear
from flowsteer_jax.models.mmdit import (
    MMDiT,
    MMDiTConfig,
    build_trunk,
    check_remat_policy,
    embed_inputs,
    run_block,
)

HEADS = ("conv", "mlp")
HEAD_PLACES = ("final", "every")  # one head on the last block (the paper's choice), or one on every block


def _groups(channels: int, max_groups: int = 32) -> int:
    return math.gcd(channels, max_groups)


class ConvHead(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32):
        hidden = max(dim // 2, 1)
        self.conv = nnx.Conv(
            dim,
            hidden,
            (4, 4),
            strides=(2, 2),
            padding=((1, 1), (1, 1)),
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, None, "embed", "mlp")},
            bias_metadata={"logical_axes": ("mlp",)},
        )
        self.norm = nnx.GroupNorm(
            hidden,
            num_groups=_groups(hidden),
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata={"logical_axes": ("mlp",)},
            bias_metadata={"logical_axes": ("mlp",)},
        )
        self.out = nnx.Conv(
            hidden,
            1,
            (1, 1),
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, None, "mlp", None)},
        )

    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        b = tokens.shape[0]
        x = tokens.astype(jnp.float32).reshape(b, *grid, tokens.shape[-1])
        x = jax.nn.leaky_relu(self.norm(self.conv(x)), 0.2)
        return self.out(x).mean(axis=(1, 2, 3))


class MLPHead(nnx.Module):
    """SwD's head: token mean, then `LayerNorm -> GELU -> Linear` with widths `linspace(C, 1, layers + 1)`."""

    def __init__(self, dim: int, *, layers: int = 3, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32):
        widths = [max(int(round(dim + (1 - dim) * i / layers)), 1) for i in range(layers + 1)]
        self.norms = nnx.List(
            [nnx.LayerNorm(w, param_dtype=param_dtype, rngs=rngs, scale_metadata={"logical_axes": (None,)},
                           bias_metadata={"logical_axes": (None,)}) for w in widths[:-1]]
        )  # fmt: skip
        self.linears = nnx.List(
            [
                linear(a, b, (None, None), rngs=rngs, param_dtype=param_dtype)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )

    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        x = tokens.astype(jnp.float32).mean(axis=1)
        for norm, lin in zip(self.norms, self.linears, strict=True):
            x = lin(jax.nn.gelu(norm(x)))
        return x[:, 0]


class Discriminator(nnx.Module):
    def __init__(
        self,
        cfg: MMDiTConfig,
        num_blocks: int,
        *,
        head: str = "conv",
        heads: str = "final",
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        implementation: str | None = None,
        remat_policy: str | None = None,
    ):
        if not 1 <= num_blocks <= cfg.num_layers:
            raise ValueError(f"disc num_blocks={num_blocks} must be in [1, {cfg.num_layers}]")
        if head not in HEADS:
            raise ValueError(f"disc head {head!r} not in {HEADS}")
        if heads not in HEAD_PLACES:
            raise ValueError(f"disc heads {heads!r} not in {HEAD_PLACES}")
        check_remat_policy(remat_policy)
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.inner_dim
        self.config, self.num_blocks, self.dtype, self.remat_policy = cfg, num_blocks, dtype, remat_policy
        # Same attribute names as MMDiT: the trunk's paths are the teacher's, so copying is path to path.
        build_trunk(self, cfg, num_blocks, implementation, **kw)
        # The heads stay float32 (small; the logit feeds the GAN loss).
        head_cls = ConvHead if head == "conv" else MLPHead
        self.head = head_cls(d, rngs=rngs, param_dtype=jnp.float32)
        # heads="every" (Table 4's per-block heads): blocks 0 .. num_blocks-2 get one each; the logit is the mean.
        n_more = num_blocks - 1 if heads == "every" else 0
        self.block_heads = nnx.List([head_cls(d, rngs=rngs, param_dtype=jnp.float32) for _ in range(n_more)])

    @classmethod
    def from_mmdit(
        cls, model: MMDiT, num_blocks: int, *, head: str = "conv", heads: str = "final", rngs: nnx.Rngs, **kw
    ) -> Discriminator:
        """A discriminator whose trunk is a *copy* (new buffers) of `model`'s first `num_blocks` blocks.

        Compute dtype, remat policy and attention kernel follow `model`; pass `param_dtype=jnp.float32` for fp32
        master weights of a bf16 model.
        """
        kw.setdefault("dtype", model.dtype)
        kw.setdefault("remat_policy", model.remat_policy)
        kw.setdefault("implementation", model.implementation)
        disc = cls(model.config, num_blocks, head=head, heads=heads, rngs=rngs, **kw)
        source = dict(nnx.to_flat_state(nnx.state(model)))
        target = nnx.state(disc)
        for path, var in nnx.to_flat_state(target):
            if path[0] in ("head", "block_heads"):
                continue
            var.set_value(jnp.array(source[path].get_value(), dtype=var.get_value().dtype, copy=True))
        nnx.update(disc, target)
        return disc

    def __call__(
        self, z: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        """z: (B, H, W, C) trajectory state; timestep: the MMDiT's ((B,) or (), `flow.sampling.timestep(sigma)`).

        Returns (logits (B,), image features after each block); with heads on every block the logit is the mean of
        theirs.
        """
        _, height, width, _ = z.shape
        p = self.config.patch_size
        h, ctx, temb = embed_inputs(self, z, timestep, encoder_hidden_states, pooled_projections)
        feats = []
        for block in self.transformer_blocks:
            h, ctx = run_block(block, h, ctx, temb, self.remat_policy)
            feats.append(h)
        grid = (height // p, width // p)
        logits = self.head(h, grid)
        if len(self.block_heads):
            logits = (logits + sum(hd(f, grid) for hd, f in zip(self.block_heads, feats, strict=False))) / (
                len(self.block_heads) + 1
            )
        return logits, feats
