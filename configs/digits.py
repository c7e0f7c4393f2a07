"""The embedded default: FlowSteer end to end in the digits world, on a laptop CPU in minutes.

    python -m flowsteer_jax.train --config=configs/digits.py --workdir=runs/digits

Pretrains the tiny MMDiT teacher on pairs of scikit-learn's 8x8 digits (once; reused from
`WORKDIR/teacher/`), distils a 4-step guidance-free student with FlowSteer (OTA start points, the adversarial
and feature-matching losses with a discriminator on the teacher's first blocks, the rectified schedule), then
evaluates teacher and student on 1,000 fixed prompts and noises and writes `report.md`, `metrics.json` and
sample grids. The ablation (paper Tables 2 and 5): `python -m flowsteer_jax.digits.ablate --workdir=runs/digits`.

Teacher CFG for distillation: w ~ U[cfg_min, cfg_max] around the guidance at which this teacher's 28-step
samples score best (`digits.teacher_guidance`, used for the teacher rows of the report); SD3's U[7, 13] is
far too strong for a model this small.
"""

import ml_collections

from flowsteer_jax.distill.config import default_config


def get_config():
    c = default_config()
    c.world = "digits"
    c.model.dtype = "float32"
    c.model.latent_shape = (8, 16, 1)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.distill.num_segments = 4
    c.distill.schedule = "rectified"
    c.distill.shift = 3.0
    c.distill.teacher_steps = 16
    c.distill.cfg_min, c.distill.cfg_max = 2.0, 4.0
    c.distill.start_points = "ota"
    c.disc.num_blocks = 2
    c.disc.head = "mlp"
    c.loss.lambda_adv, c.loss.lambda_fm = 0.1, 0.1
    c.train.num_steps = 200
    c.train.batch_size = 32
    c.train.log_every = 10
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 100
    c.optim.lora.lr = 1e-3
    c.optim.disc.lr = 1e-4
    c.digits = ml_collections.ConfigDict(
        dict(
            teacher_dir="",  # "" = WORKDIR/teacher; the ablation shares one teacher between its runs
            teacher_train_steps=2500,
            teacher_batch_size=64,
            teacher_seed=0,
            teacher_guidance=3.0,
            text_seed=0,
            pool_size=20_000,  # training pairs (prompts + real images, the latter only for PeRFlow's x0)
            pool_seed=0,
            eval_samples=1000,
        )
    )
    return c
