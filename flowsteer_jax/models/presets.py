"""Published architectures of the SD3 family (the diffusers `config.json` values), for work without weights.

The compile-only budgets (`benchmarks/chip_budget.py`) and memory benchmarks build abstract models of these
shapes; a run with weights reads the folder's own config.json instead.
"""

from __future__ import annotations

from flowsteer_jax.models.mmdit import MMDiTConfig
from flowsteer_jax.models.vae import AutoencoderKLConfig

TRANSFORMERS: dict[str, MMDiTConfig] = {
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2.0 B parameters)
    "sd3_medium": MMDiTConfig(
        sample_size=128,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        joint_attention_dim=4096,
        pos_embed_max_size=192,
    ),
    # stabilityai/stable-diffusion-3.5-large, transformer/config.json (8.1 B parameters)
    "sd3_5_large": MMDiTConfig(
        sample_size=128,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        joint_attention_dim=4096,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
}

# Both models share SD3's 16-channel VAE (vae/config.json).
SD3_VAE = AutoencoderKLConfig(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Prompt tokens: 77 CLIP + `max_sequence_length` T5 (256 in SD3's pipeline), at T5's width.
CLIP_TOKENS = 77
