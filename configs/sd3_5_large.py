"""FlowSteer on Stable Diffusion 3.5 Large (38 MMDiT blocks with RMS qk-norm, 1024x1024).

    python -m flowsteer_jax.train --config=configs/sd3_5_large.py --workdir=runs/sd35l \\
        --config.model.path=/data/stable-diffusion-3.5-large --config.data.prompts=prompts.txt

As `sd3_medium.py`, scaled: the discriminator takes the first half of the blocks (19 of 38, the paper's
"half the trunk" finding), full remat, and FSDP over 8 devices by default — 8B bf16 base weights do not leave
room for training on one device. Use a batch that is a multiple of all devices.
"""

from flowsteer_jax.distill.config import default_config


def get_config():
    c = default_config()
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.latent_shape = (128, 128, 16)
    c.distill.num_segments = 4
    c.distill.schedule = "rectified"
    c.distill.shift = 3.0
    c.distill.teacher_steps = 28
    c.distill.cfg_min, c.distill.cfg_max = 7.0, 13.0
    c.distill.start_points = "ota"
    c.disc.num_blocks = 19
    c.loss.lambda_adv, c.loss.lambda_fm = 0.5, 1.0
    c.mesh.shape = (-1, 8, 1)
    c.train.num_steps = 10_000
    c.train.batch_size = 16
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.optim.lora.total_steps = c.optim.disc.total_steps = 10_000
    return c
