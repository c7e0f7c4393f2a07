"""The distillation config: `default_config()` is the base every `configs/*.py` file builds on.

Shape (all keys always present; `configs/` files override values, never add keys):

- `seed`: base PRNG seed; step `i` uses `fold_in(PRNGKey(seed), i)`.
- `world`: "sd3" (a diffusers SD3 folder + a prompt file) | "digits" (the embedded default, `configs/digits.py`) |
  a module path `pkg.module` whose `make_world(config, workdir)` returns a `flowsteer_jax.worlds.World`.
- `model.path`: the diffusers SD3 pipeline folder (transformer, text encoders, tokenizers, VAE, scheduler).
  `model.dtype`: compute/storage dtype of the frozen base and text encoders ("bfloat16" | "float32").
  `model.attention`: attention kernel ("" = the platform's: cuDNN flash on GPU, splash on TPU, XLA on CPU |
  "xla" | "cudnn" | "splash"; `models/attention.py`).
  `model.preset`: the published architecture the file is written for ("sd3_medium" | "sd3_5_large" | "",
  `models/presets.py`): what `benchmarks/chip_budget.py` compiles when there are no weights at hand.
- `model.remat_policy`: "" (none) | "full" | "dots" | "dots_all" (per-block remat of student, teacher and D).
- `model.latent_shape`: (H, W, C) of the latents the step samples noise for (channels-last); () = the
  transformer's `sample_size` square with its `in_channels`.
- `train.num_steps`, `train.batch_size` (global; divides by the mesh's data x fsdp devices and by the number of
  processes), `train.max_bad_steps` (abort after this many non-finite steps in a row), `train.log_every`.
- `checkpoint.every_steps` (also at the end and on SIGTERM/SIGINT), `checkpoint.keep` (newest kept).
  `checkpoint.allow_changes`: run-defining settings (`flowsteer_jax.checkpoint.RUN_KEYS`: seed, world,
  model.dtype, train.batch_size, the data stream, lora, disc, distill, loss, adv, optim) that a resume may change
  on purpose: dotted keys or prefixes, e.g. `("optim.lora.lr",)` or `("optim",)`, or "base_fingerprint" for
  other base weights with the same config.json; () = every change is refused (`train.num_steps` always may).
  `checkpoint.resume_step`: the step to resume (-1 = the newest); an older one moves the newer steps to
  `WORKDIR/checkpoints_set_aside/` (never deleted): for a newest step that cannot be read, or a rollback.
- `data.prompts`: a .txt / .jsonl / .parquet prompt file (`flowsteer_jax/data.py`); `data.shuffle`;
  `data.negative_prompt` (CFG's unconditional prompt, "" as SD3); `data.max_sequence_length` (T5 tokens);
  `data.cache_embeddings` (encode every prompt once into `WORKDIR/embeddings/` and read rows from there).
- `eval.every_steps` (0: only at the end), `eval.prompts` (fixed prompts of the sample grid), `eval.seed`.
- `distributed.coordinator_address` ("" = single process unless `distributed.auto`), `distributed.num_processes`,
  `distributed.process_id`, `distributed.auto` (`jax.distributed.initialize()` from the environment: TPU pods,
  SLURM, ...).
- `lora.rank`, `lora.alpha` (scale = alpha / rank), `lora.targets` (dotted path suffixes, see
  `models/lora.py`), `lora.dtype` (adapter parameter dtype).
- `distill.num_segments` K (windows) and `distill.schedule` ("rectified" | "diffusers") with `distill.shift`: the window
  boundaries `schedules.sigmas(K, schedule, shift)`, also the student's inference grid.
- `distill.teacher_steps`: Euler steps of the teacher in total over [1, 0], on a grid that contains the
  boundaries (split as evenly as possible between windows in the unshifted time).
- `distill.cfg_min`, `distill.cfg_max`: teacher guidance `w ~ U[cfg_min, cfg_max]`, one per sample.
- `distill.start_points`: "ota" (teacher trajectory from noise, FlowSteer) | "interpolate" (PeRFlow:
  `(1 - s_k) x0 + s_k eps` from `batch["x0"]`, the teacher solved inside each window only).
- `loss.lambda_adv`, `loss.lambda_fm`: weights of `L_adv`, `L_FM`; both 0 removes the discriminator.
- `adv.student_states`: "one_step" (one student step from the authentic start of each window) | "rollout"
  (the student's own K-step chain from the same noise, remat per step).
- `disc.num_blocks`, `disc.head` ("conv" | "mlp"), `disc.param_dtype` (its trainable weights; the trunk
  computes in the base model's dtype, so a bf16 base gets an fp32-master discriminator by default).
- `optim.lora.*`, `optim.disc.*`: AdamW `lr`, `b1`, `b2`, `eps`, `weight_decay`, `clip_norm` (global norm,
  inside the branch; 0 disables), `schedule` ("constant" | "cosine"), `warmup_steps`, `total_steps`.
- `mesh.shape`: (data, fsdp, tensor), one -1 fills; `mesh.rules`: logical axis -> mesh axes.
"""

from __future__ import annotations

import ml_collections

from flowsteer_jax.models.lora import DEFAULT_TARGETS
from flowsteer_jax.parallel import DEFAULT_RULES

EVAL_PROMPTS = (
    "a photo of a red fox in the snow",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
)


def _adamw(lr: float, weight_decay: float, clip_norm: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            schedule="constant",
            warmup_steps=0,
            total_steps=10_000,
        )
    )


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.world = "sd3"
    c.model = ml_collections.ConfigDict(
        dict(path="", preset="", dtype="bfloat16", attention="", remat_policy="", latent_shape=(128, 128, 16))
    )
    c.train = ml_collections.ConfigDict(dict(num_steps=10_000, batch_size=8, max_bad_steps=20, log_every=10))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, allow_changes=(), resume_step=-1))
    c.data = ml_collections.ConfigDict(
        dict(prompts="", shuffle=True, negative_prompt="", max_sequence_length=256, cache_embeddings=False)
    )
    c.eval = ml_collections.ConfigDict(dict(every_steps=500, prompts=EVAL_PROMPTS, seed=1234))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0, auto=False))
    c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=64.0, targets=DEFAULT_TARGETS, dtype="float32"))
    c.distill = ml_collections.ConfigDict(
        dict(
            num_segments=4,
            schedule="rectified",
            shift=3.0,
            teacher_steps=28,
            cfg_min=7.0,
            cfg_max=13.0,
            start_points="ota",
        )
    )
    c.loss = ml_collections.ConfigDict(dict(lambda_adv=0.5, lambda_fm=1.0))
    c.adv = ml_collections.ConfigDict(dict(student_states="one_step"))
    c.disc = ml_collections.ConfigDict(dict(num_blocks=12, head="conv", param_dtype="float32"))
    c.optim = ml_collections.ConfigDict()
    c.optim.lora = _adamw(1e-4, 1e-2, 1.0)
    c.optim.disc = _adamw(1e-4, 1e-2, 1.0)
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=dict(DEFAULT_RULES)))
    return c


def uses_discriminator(config: ml_collections.ConfigDict) -> bool:
    return config.loss.lambda_adv != 0 or config.loss.lambda_fm != 0
