"""FlowSteer in the compositional digits world: a 2x2 canvas of coloured digits, in the latent space of a VAE.

    python -m flowsteer_jax.train --config=configs/digits_compose.py --workdir=runs/digits_compose

Trains the world's tiny SD3-architecture VAE (`WORKDIR/vae/`) and pretrains the MMDiT teacher in its latents
(`WORKDIR/teacher/`; both reused by later runs), distils a 4-step guidance-free student with FlowSteer, then
evaluates teacher and student on 1,000 fixed GenEval-like prompts and writes `report.md` and `metrics.json`.
"""

import ml_collections

from flowsteer_jax.distill.config import default_config


def get_config():
    c = default_config()
    c.world = "digits_compose"
    c.model.dtype = "float32"
    c.model.latent_shape = (12, 12, 4)
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.distill.num_segments = 4
    c.distill.schedule = "rectified"
    c.distill.shift = 3.0
    c.distill.teacher_steps = 16
    # OTA's CFG below the teacher rows' w = 5: at U[4, 6] the student inherited the strong guidance's wrong digit
    # counts (prompt accuracy 0.242, count 0.585); at U[2, 4] 0.276 and 0.735 (one run each, same teacher).
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
    c.compose = ml_collections.ConfigDict(
        dict(
            vae_dir="",  # "" = WORKDIR/vae
            vae_train_steps=500,
            vae_seed=0,
            teacher_dir="",  # "" = WORKDIR/teacher
            teacher_train_steps=2000,
            teacher_batch_size=64,
            teacher_seed=0,
            teacher_layers=4,
            # Width 48: over 3 teacher seeds its 28-step CFG samples beat its 4-step ones by 6.0 points (width 32 at
            # 2,500 steps: 5.4, with a 0.32 teacher); 2,000 steps keep the main job within 10 minutes.
            teacher_heads=3,
            teacher_head_dim=16,
            teacher_lr=3e-3,
            teacher_guidance=5.0,
            text_seed=0,
            pool_size=20_000,  # training scenes (prompts + VAE latents: the teacher's data and PeRFlow's x0)
            pool_seed=0,
            # The prompt tasks trained and evaluated (comma-separated names of data.TASKS; "" = all six). All six left
            # the CPU teacher near chance (0.14 prompt accuracy) and its 4-step self as good.
            tasks="single,colour,two",
            eval_samples=1000,
            # The fraction of training captions corrupted (compose.data.corrupt_captions: a wrong colour, a caption
            # naming fewer objects, a swapped digit), as LAION's captions are noisy; 0 = every caption right.
            caption_noise=0.0,
            # The same for the teacher's data: 0 = a teacher trained on curated captions (as SD3's aesthetic and
            # instruction tuning is curated) while the distillation pool stays noisy.
            teacher_caption_noise=0.0,
            # The ablation refuses to train rows until the teacher-only gate passes (digits.ablate.gate: Table 1
            # shows the interpolated-start drop, few steps and CFG matter); for worlds built to show the mechanism.
            gate=False,
        )
    )
    return c
