"""Tiny config: the whole training run on a tiny random SD3 in a minute on a CPU (CI smoke test, quick trials).

    python -m flowsteer_jax.tools.tiny_model --out=runs/tiny_sd3
    python -m flowsteer_jax.train --config=configs/tiny.py --workdir=runs/tiny

The model is random, so the samples are noise-like: this checks that every part of the run works (data,
OTA, LoRA, discriminator, checkpoints, resume, logs), not that it learns anything.
"""

from flowsteer_jax.distill.config import default_config

PROMPTS = "configs/prompts/tiny.txt"


def get_config():
    c = default_config()
    c.model.path = "runs/tiny_sd3"
    c.model.dtype = "float32"
    c.model.latent_shape = ()  # the tiny transformer's sample_size: 16x16x16
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.distill.teacher_steps = 8
    c.disc.num_blocks = 1
    c.disc.head = "mlp"
    c.train.num_steps = 6
    c.train.batch_size = 2
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 0
    c.eval.prompts = ("a red cat", "a blue dog")
    c.data.prompts = PROMPTS
    c.data.max_sequence_length = 16
    c.optim.lora.lr = 1e-3
    c.optim.disc.lr = 1e-3
    return c
