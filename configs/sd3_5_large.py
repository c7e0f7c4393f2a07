"""FlowSteer on Stable Diffusion 3.5 Large (38 MMDiT blocks with RMS qk-norm, 1024x1024).

    python -m flowsteer_jax.train --config=configs/sd3_5_large.py --workdir=runs/sd35l \\
        --config.model.path=/data/stable-diffusion-3.5-large --config.data.prompts=prompts.txt

`sd3_medium.py`'s paper settings, scaled: the discriminator takes the first half of the blocks (19 of 38, the
paper's "half the trunk" finding), full remat, and FSDP over 8 devices by default (mesh (-1, 8, 1): 8-way FSDP
inside each data-parallel replica). Use a batch that is a multiple of all devices.

Fits (XLA's compilers, `python benchmarks/chip_budget.py --config=configs/sd3_5_large.py --chip=h100 --devices=8`;
README table): **8x H100 80 GB at 44.0 GiB per GPU** (batch 16, 2 prompts per GPU), and one H200 141 GB at
95.1 GiB with `--config.mesh.shape="(1,1,1)" --config.train.batch_size=2`; 1-4 H100s not measured.
"""

# config_flags loads this file by path; configs/ is also a package of the installed project (pyproject.toml).
from configs.sd3_medium import get_config as sd3_medium_config


def get_config():
    c = sd3_medium_config()
    c.model.preset = "sd3_5_large"
    c.model.remat_policy = "full"
    c.disc.num_blocks = 19
    c.mesh.shape = (-1, 8, 1)
    c.train.batch_size = 16
    return c
