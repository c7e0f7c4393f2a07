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
  model.dtype, train.batch_size, the data stream, lora, disc, distill, loss, adv, optim, and the world's own
  section) that a resume may change on purpose: dotted keys or prefixes, e.g. `("optim.lora.lr",)` or
  `("optim",)`, or "base_fingerprint" for other base weights with the same config.json, "components.<name>"
  (another text encoder, ...), "prompts" (other prompt texts); () = every change is refused (`train.num_steps`
  always may).
  `checkpoint.resume_step`: the step to resume (-1 = the newest); an older one moves the newer steps to
  `WORKDIR/checkpoints_set_aside/` (never deleted): for a newest step that cannot be read, or a rollback.
- `data.prompts`: a .txt / .jsonl / .parquet prompt file, a glob or folder of them, or a `datasets` save_to_disk
  folder, streamed (`flowsteer_jax/data.py`); `data.text_column` (the jsonl field / parquet or arrow column);
  `data.shuffle`; `data.negative_prompt` (CFG's unconditional prompt, "" as SD3); `data.max_sequence_length` (T5
  tokens); `data.cache_embeddings` (encode every prompt once into `WORKDIR/embeddings/` and read rows from there; the
  same embeddings, bit for bit), refused when it would take more than `data.cache_max_gib` GiB.
- `eval.every_steps` (0: only at the end), `eval.prompts` (fixed prompts of the sample grid), `eval.seed`;
  `eval.metrics`: scores of those samples logged to TensorBoard (`eval/<metric>`) with the grid: "auto" (every
  metric `eval.weights` allows, plus the world's own, e.g. the digits world's prompt accuracy), "" (none), or a
  comma list of `flowsteer_jax.evaluate.METRICS` names; `eval.weights` (the evaluate command's `--weights` folder),
  `eval.ref` (real images for FID/KID).
- `distributed.coordinator_address` ("" = single process unless `distributed.auto`), `distributed.num_processes`,
  `distributed.process_id`, `distributed.auto` (`jax.distributed.initialize()` from the environment: TPU pods,
  SLURM, ...). A setting that cannot take effect (processes without a coordinator, `auto` with one) is an error.
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
  `loss.gan`: the adversarial game, "hinge" (the paper's: D hinge, `L_adv = -E D`) | "non_saturating" |
  "least_squares" (`distill.losses.GAN_LOSSES`; the paper's Table 4 compares the three).
  `loss.window_weighting`: how `L_dist` weighs the K windows, "uniform" (1/K each) | "length" (by the window's
  length, as the paper's integral over each window does); docs/design.md, "The FlowSteer step".
- `adv.student_states`: "one_step" (one student step from the authentic start of each window) | "rollout"
  (the student's own K-step chain from the same noise, remat per step).
- `disc.num_blocks`, `disc.head` ("conv" | "mlp"), `disc.param_dtype` (its trainable weights; the trunk
  computes in the base model's dtype, so a bf16 base gets an fp32-master discriminator by default).
  `disc.heads`: "final" (one head on the last block, the paper's) | "every" (one per block, logits averaged);
  `disc.trunk`: "full" (the copied blocks train, the paper's) | "frozen" (heads only) | "lora" (LoRA adapters
  of `lora.rank`/`lora.targets` on the trunk, plus the heads). The paper's Table 4 compares these.
- `optim.lora.*`, `optim.disc.*`: AdamW `lr`, `b1`, `b2`, `eps`, `weight_decay`, `clip_norm` (global norm,
  inside the branch; 0 disables), `schedule` ("constant" | "cosine"), `warmup_steps`, `total_steps`.
- `ema.decay`: an exponential moving average of the student's LoRA, kept in the train state (`train_state["ema"]`)
  and checkpointed; 0 = off (no EMA in the state). When on, the eval grid, the world's report, the export and
  `SD3Pipeline.load_lora(workdir)` use the EMA weights. `ema.start_step`: through this many optimizer steps the
  EMA copies the weights, averaging after (`distill.step.ema_update`).
- `log.wandb`: also log to Weights & Biases (the optional `wandb` package; `flowsteer_jax/tracking.py`), into
  the project `log.wandb_project`; `WANDB_MODE=offline` logs without a network. TensorBoard always logs.
- `mesh.shape`: (data, fsdp, tensor), one -1 fills; `mesh.rules`: logical axis -> mesh axes.

`validate(config)` checks every value above (ranges, names, `cfg_min <= cfg_max`, ...) without touching a device
or a file, and raises one `InputError` listing each bad key; the trainer calls it before anything loads.
`validate_batch(config, batch_devices, processes)` adds what needs the mesh: `train.batch_size` must divide.
`validate_model(config, transformer_config, latent_shape)` adds what needs the base transformer's `config.json`
(read before any model loads): the LoRA targets, `disc.num_blocks`, the latent shape against the patch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

from conversion.errors import InputError, shorten
from conversion.sd3_transformer import linear_modules, normalize_config
from flowsteer_jax.distill.losses import GAN_LOSSES, WINDOW_WEIGHTINGS
from flowsteer_jax.evaluation.metrics import METRICS
from flowsteer_jax.models.lora import DEFAULT_TARGETS, unmatched_targets
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
        dict(
            prompts="",
            text_column="prompt",
            shuffle=True,
            negative_prompt="",
            max_sequence_length=256,
            cache_embeddings=False,
            cache_max_gib=256.0,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(every_steps=500, prompts=EVAL_PROMPTS, seed=1234, metrics="auto", weights="", ref="")
    )
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
    c.loss = ml_collections.ConfigDict(dict(lambda_adv=0.5, lambda_fm=1.0, gan="hinge", window_weighting="uniform"))
    c.adv = ml_collections.ConfigDict(dict(student_states="one_step"))
    c.disc = ml_collections.ConfigDict(
        dict(num_blocks=12, head="conv", heads="final", trunk="full", param_dtype="float32")
    )
    c.optim = ml_collections.ConfigDict()
    c.optim.lora = _adamw(1e-4, 1e-2, 1.0)
    c.optim.disc = _adamw(1e-4, 1e-2, 1.0)
    c.ema = ml_collections.ConfigDict(dict(decay=0.0, start_step=0))
    c.log = ml_collections.ConfigDict(dict(wandb=False, wandb_project="flowsteer"))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=dict(DEFAULT_RULES)))
    return c


def uses_discriminator(config: ml_collections.ConfigDict) -> bool:
    return config.loss.lambda_adv != 0 or config.loss.lambda_fm != 0


SEED_LIMIT = 2**32  # PRNGKey keeps 32 bits without jax_enable_x64: seed 2**32 would silently equal seed 0
MAX_SEQUENCE_LENGTH = 512  # T5's, as diffusers' SD3 pipeline enforces (`check_inputs`)
DTYPES = ("float32", "bfloat16", "float16")  # what `model.dtype`, `lora.dtype` and `disc.param_dtype` may name
OPTIM_SCHEDULES = ("constant", "cosine")


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every bad value of `config` as `key=value <what is allowed>` (empty: all good)."""
    from flowsteer_jax.distill.ota import START_POINTS
    from flowsteer_jax.distill.step import STUDENT_STATES
    from flowsteer_jax.flow.schedules import KINDS
    from flowsteer_jax.models.attention import ATTENTION_IMPLEMENTATIONS
    from flowsteer_jax.models.discriminator import HEAD_PLACES, HEADS
    from flowsteer_jax.models.mmdit import REMAT_POLICIES
    from flowsteer_jax.models.presets import TRANSFORMERS

    out: list[str] = []

    def get(key: str):
        node = config
        for part in key.split("."):
            node = node[part]
        return node

    def number(
        key: str, low: float | None = None, *, above: bool = False, integer: bool = False, below: int | None = None
    ) -> None:
        v = get(key)
        kind = "an integer" if integer else "a number"
        if not _number(v) or (integer and not isinstance(v, int)):
            out.append(f"{key}={shorten(repr(v))} is not {kind}")
        elif low is not None and (v <= low if above else v < low):
            out.append(f"{key}={v!r} must be {'>' if above else '>='} {low:g}")
        elif below is not None and v >= below:
            out.append(f"{key}={v!r} must be < {below}")

    def one_of(key: str, allowed: Sequence[str]) -> None:
        v = get(key)
        if not isinstance(v, str) or v not in allowed:
            out.append(f"{key}={shorten(repr(v))} not in {tuple(allowed)!r}")

    def text(key: str) -> None:
        v = get(key)
        if not isinstance(v, str):
            out.append(f"{key}={shorten(repr(v))} must be a string")

    number("seed", 0, integer=True, below=SEED_LIMIT)
    if not isinstance(config.world, str) or not config.world:
        out.append(f"world={shorten(repr(config.world))} must name a world ('sd3', 'digits' or a module path)")
    text("model.path")
    one_of("model.preset", ("", *TRANSFORMERS))
    one_of("model.dtype", DTYPES)
    one_of("model.attention", tuple("" if a is None else a for a in ATTENTION_IMPLEMENTATIONS))
    one_of("model.remat_policy", ("", *REMAT_POLICIES))
    shape = tuple(config.model.latent_shape)
    if shape and (len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        out.append(f"model.latent_shape={shorten(repr(shape))} must be () or (H, W, C) of positive integers")
    number("train.num_steps", 1, integer=True)
    number("train.batch_size", 1, integer=True)
    number("train.max_bad_steps", 0, integer=True)
    number("train.log_every", 0, integer=True)
    number("checkpoint.every_steps", 0, integer=True)
    number("checkpoint.keep", 1, integer=True)
    number("checkpoint.resume_step", -1, integer=True)
    allow = config.checkpoint.allow_changes
    if isinstance(allow, str) or not all(isinstance(k, str) and k for k in allow):
        out.append(
            f"checkpoint.allow_changes={shorten(repr(allow))} must be a tuple of dotted keys, e.g. ('optim.lora.lr',)"
        )
    text("data.prompts")
    text("data.negative_prompt")
    number("data.max_sequence_length", 1, integer=True, below=MAX_SEQUENCE_LENGTH + 1)
    if not isinstance(config.data.text_column, str) or not config.data.text_column:
        out.append(f"data.text_column={config.data.text_column!r} must name the prompts' column (e.g. 'prompt')")
    number("data.cache_max_gib", 0, above=True)
    number("eval.every_steps", 0, integer=True)
    number("eval.seed", 0, integer=True, below=SEED_LIMIT)
    if isinstance(config.eval.prompts, str) or not all(isinstance(p, str) for p in config.eval.prompts):
        out.append(f"eval.prompts={shorten(repr(config.eval.prompts))} must be a sequence of strings")
    metrics = config.eval.metrics
    names = [] if not isinstance(metrics, str) or metrics == "auto" else [m for m in metrics.split(",") if m]
    if not isinstance(metrics, str) or any(m not in METRICS for m in names):
        out.append(f"eval.metrics={shorten(repr(metrics))} must be 'auto', '' or a comma list of {list(METRICS)}")
    number("distributed.num_processes", 1, integer=True)
    number("distributed.process_id", 0, integer=True)
    d = config.distributed
    if _number(d.num_processes) and _number(d.process_id) and d.process_id >= d.num_processes:
        out.append(f"distributed.process_id={d.process_id} must be < distributed.num_processes={d.num_processes}")
    if d.coordinator_address and d.auto:
        out.append("distributed.auto=True and distributed.coordinator_address are exclusive: give one")
    elif not d.coordinator_address and (d.num_processes != 1 or d.process_id != 0):
        # ignored without a coordinator: each process would train alone, all in the same workdir
        how = (
            "is read from the environment with distributed.auto" if d.auto else "needs distributed.coordinator_address"
        )
        out.append(f"distributed.num_processes={d.num_processes}, process_id={d.process_id} cannot take effect: {how}")
    number("lora.rank", 1, integer=True)
    number("lora.alpha", 0, above=True)
    targets = config.lora.targets
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
        out.append(f"lora.targets={shorten(repr(targets))} must be a tuple of dotted layer names, e.g. ('to_q',)")
    elif not tuple(targets):
        out.append("lora.targets=() must name at least one layer")
    one_of("lora.dtype", DTYPES)

    number("distill.num_segments", 1, integer=True)
    number("distill.teacher_steps", 1, integer=True)
    k, steps = config.distill.num_segments, config.distill.teacher_steps
    if _number(k) and _number(steps) and k >= 1 and steps < k:
        out.append(f"distill.teacher_steps={steps} must be >= distill.num_segments={k} (one step per window at least)")
    one_of("distill.schedule", KINDS)
    number("distill.shift", 0, above=True)
    number("distill.cfg_min", 0)
    number("distill.cfg_max", 0)
    lo, hi = config.distill.cfg_min, config.distill.cfg_max
    if _number(lo) and _number(hi) and lo > hi:
        out.append(f"distill.cfg_min={lo:g} > distill.cfg_max={hi:g} (the guidance is drawn from U[cfg_min, cfg_max])")
    one_of("distill.start_points", START_POINTS)
    number("loss.lambda_adv", 0)
    number("loss.lambda_fm", 0)
    one_of("loss.gan", tuple(GAN_LOSSES))
    one_of("loss.window_weighting", WINDOW_WEIGHTINGS)
    one_of("adv.student_states", STUDENT_STATES)
    number("disc.num_blocks", 1, integer=True)
    one_of("disc.head", HEADS)
    one_of("disc.heads", HEAD_PLACES)
    one_of("disc.trunk", ("full", "frozen", "lora"))
    one_of("disc.param_dtype", DTYPES)
    if uses_discriminator(config) and _number(config.train.batch_size) and config.train.batch_size == 1:
        out.append(
            "train.batch_size=1 with the discriminator on (loss.lambda_adv or loss.lambda_fm nonzero): its hinge loss "
            "needs a batch of >= 2 (or set both to 0)"
        )
    for branch in ("lora", "disc"):
        p = f"optim.{branch}"
        number(f"{p}.lr", 0, above=True)
        for beta in ("b1", "b2"):
            number(f"{p}.{beta}", 0)
            v = get(f"{p}.{beta}")
            if _number(v) and v >= 1:
                out.append(f"{p}.{beta}={v!r} must be < 1")
        number(f"{p}.eps", 0)
        number(f"{p}.weight_decay", 0)
        number(f"{p}.clip_norm", 0)
        one_of(f"{p}.schedule", OPTIM_SCHEDULES)
        number(f"{p}.warmup_steps", 0, integer=True)
        number(f"{p}.total_steps", 1, integer=True)
    number("ema.decay", 0)
    if _number(config.ema.decay) and config.ema.decay >= 1:
        out.append(f"ema.decay={config.ema.decay!r} must be < 1 (0 = no EMA)")
    number("ema.start_step", 0, integer=True)
    if not isinstance(config.log.wandb, bool):
        out.append(f"log.wandb={config.log.wandb!r} must be True or False")
    if not isinstance(config.log.wandb_project, str) or not config.log.wandb_project:
        out.append(f"log.wandb_project={config.log.wandb_project!r} must name a W&B project")

    mesh = tuple(config.mesh.shape)
    if len(mesh) != 3 or not all(isinstance(v, int) and (v >= 1 or v == -1) for v in mesh) or mesh.count(-1) > 1:
        out.append(f"mesh.shape={shorten(repr(mesh))} must be (data, fsdp, tensor): integers >= 1, at most one -1")
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every config value before anything loads (no device, no file): one `InputError` naming each bad key.

    The trainer calls it first thing; benchmarks and tools that take a config can too.
    """
    problems = _problems(config)
    if problems:
        raise InputError("bad config: " + "; ".join(problems))


def validate_batch(config: ml_collections.ConfigDict, batch_devices: int, processes: int) -> None:
    """What needs the mesh: `train.batch_size` divides by the mesh's batch devices and by the number of processes."""
    batch_size = int(config.train.batch_size)
    if batch_size % max(batch_devices, 1) or batch_size % processes:
        raise InputError(
            f"train.batch_size={batch_size} must divide by the mesh's batch devices ({batch_devices}) and by the "
            f"number of processes ({processes})"
        )


def config_latent_shape(
    config: ml_collections.ConfigDict, transformer_config: dict, source: str = "config.json"
) -> tuple[int, int, int]:
    """`model.latent_shape`, else the transformer config's (from the file `source`) `sample_size` square with its
    `in_channels`."""
    if tuple(config.model.latent_shape):
        return tuple(int(v) for v in config.model.latent_shape)
    tc = normalize_config(transformer_config, source)
    return (int(tc["sample_size"]), int(tc["sample_size"]), int(tc["in_channels"]))


def validate_model(
    config: ml_collections.ConfigDict,
    transformer_config: dict,
    latent_shape: Sequence[int],
    source: str = "config.json",
) -> None:
    """What needs the base transformer's `config.json` (`source` names it), checked before any model loads: the
    LoRA targets match Linear layers (of the student, and of the discriminator's trunk with `disc.trunk="lora"`),
    `disc.num_blocks` is at most the depth, and the latent shape fits the patch size, channels and position table.
    One `InputError` naming each bad key."""
    tc = normalize_config(transformer_config, source)
    out: list[str] = []
    linears = linear_modules(tc)
    missing = unmatched_targets(linears, tuple(config.lora.targets))
    if missing:
        out.append(f"lora.targets {shorten(missing)} match no Linear layer of the transformer")
    depth = tc["num_layers"]
    if uses_discriminator(config):
        blocks = int(config.disc.num_blocks)
        if blocks > depth:
            out.append(f"disc.num_blocks={blocks} must be <= the transformer's num_layers={depth}")
        elif config.disc.trunk == "lora":
            trunk = [n for n in linears if n.startswith("transformer_blocks.") and int(n.split(".")[1]) < blocks]
            missing = unmatched_targets(trunk, tuple(config.lora.targets))
            if missing:
                out.append(
                    f"lora.targets {shorten(missing)} match no Linear layer of the discriminator's trunk "
                    f"(disc.trunk='lora', disc.num_blocks={blocks})"
                )
    shape = tuple(latent_shape)
    (h, w, c), p, table = shape, tc["patch_size"], tc["pos_embed_max_size"]
    latent = f"latent shape {shape} (model.latent_shape)"
    if h % p or w % p:
        out.append(f"{latent}: H and W must divide by the patch size {p}")
    elif max(h, w) // p > table:
        out.append(f"{latent}: more than pos_embed_max_size={table} patches of {p} a side")
    if c != tc["in_channels"]:
        out.append(f"{latent}: C must be in_channels={tc['in_channels']}")
    if out:
        raise InputError(f"bad config for the model of {source}: " + "; ".join(out))
