r"""Export a FlowSteer student (a training workdir's LoRA) to diffusers (and ComfyUI).

    python -m flowsteer_jax.export --checkpoint=WORKDIR --out=DIR [--step=N] [--fuse] \
        [--dtype=bf16|fp16|fp32] [--model=FOLDER] [--format=peft|comfyui|both] [--overwrite] [--noema]

(also `flowsteer-export ...`, and `python conversion/export_to_diffusers.py ...`, the old path, still works).

Writes into DIR:
- `pytorch_lora_weights.safetensors` (`--format=peft|both`): PEFT keys `transformer.<module>.lora_A/lora_B.weight`,
  the `alpha / rank` scale folded into lora_B; loads with `StableDiffusion3Pipeline.load_lora_weights(DIR)` or
  `SD3Transformer2DModel.load_lora_adapter` (and in ComfyUI, whose SD3 key map knows `transformer.<module>`);
- `comfyui_lora.safetensors` (`--format=comfyui|both`, the default both): kohya-style
  `lora_transformer_<module with dots as underscores>.lora_down.weight (r, in)`, `.lora_up.weight (out, r)` and
  `.alpha` (scale alpha / r), the OneTrainer prefix ComfyUI maps to diffusers module names (diffusers 0.42 has no
  SD3 converter for non-diffusers keys: it loads only the PEFT file);
- with `--fuse`, `transformer/` (config.json + safetensors, sharded above `--max_shard_bytes`): the base weights
  with the LoRA merged in (`SD3Transformer2DModel.from_pretrained`);
- `README.md` (base model, training summary, how to sample in diffusers) and `export.json` (step, workdir, base
  model, the base's `weights_fingerprint`).
The discriminator is never exported. `--model` (the base diffusers SD3 folder, or its `transformer/`) defaults to
the one recorded in the checkpoint; it is needed for `--fuse` and must have the checkpoint's transformer config,
and, when the checkpoint records `base_fingerprint`, the same weights (else refused; an older checkpoint without it
gets a one-line warning). `--dtype`: of the LoRA files (default fp32) and of the fused transformer (default: the
base's stored dtype).
The adapters are the run's EMA when it kept one (`ema.decay > 0`), else, or with `--noema`, its trained weights;
`export.json` says which (`"weights": "ema" | "raw"`).

Never overwrites (`flowsteer_jax.outputs`): DIR must not exist or be empty, unless `--overwrite`, which replaces an
earlier export whole (no stale shards or index) when it holds only the files it wrote. A model, a training workdir,
a checkpoint, another program's output, the base and the workdir read here (DIR being, holding or inside one) are
refused even with `--overwrite`. Everything is written to `DIR.tmp-<host>-<pid>` and renamed into place at the end
(an old DIR is moved aside, then deleted), so an interrupted export leaves no half-written model at DIR; the next
export to DIR removes a killed one's temporary. `DIR/export.log` is the log, named by a failure's one line.
Bad input (a missing, incomplete or unreadable checkpoint step, naming it and the other steps; a mismatched base;
a refused DIR) is one line `flowsteer_jax.export: error: ...` on stderr and exit code 2; nothing is deleted.

Pure numpy + orbax: never imports torch, nor any JAX model code (of flowsteer_jax only the numpy sigma schedules
and the flag helper).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

from conversion import sd3_transformer
from conversion.errors import InputError
from conversion.lora import COMFYUI_FILE, PEFT_FILE, fuse, lora_pairs, to_comfyui, to_peft
from conversion.safetensors_io import ConversionError, open_checkpoint, save_checkpoint, weights_fingerprint
from conversion.table import check_checkpoint
from conversion.training_checkpoint import CheckpointError, read_lora, resolve_step, uses_ema
from flowsteer_jax import cli, outputs
from flowsteer_jax.flow import schedules

PROG = "flowsteer_jax.export"
FORMATS = ("peft", "comfyui", "both")
EXPORT_RECORD = "export.json"  # what the folder was exported from


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


def rectified_sigmas(num_steps: int, shift: float) -> list[float]:
    """The student's `num_steps` model-call sigmas `shift(linspace(1, 0, n + 1))[:-1]` (`schedules.sigmas`), each
    written as the shortest decimal that rounds to the same float32 (what diffusers and our sampler use):
    `[1.0, 0.9, 0.75, 0.5]`."""
    return [float(str(x)) for x in schedules.sigmas(int(num_steps), "rectified", float(shift))[:-1]]


def student_schedule(config: dict) -> tuple[int, float, str]:
    """(number of steps, shift, schedule kind) the student was distilled for, from the run's config."""
    d = config.get("distill", {})
    n = d.get("num_segments", d.get("num_windows", 4))
    return int(n), float(d.get("shift", 3.0)), str(d.get("schedule", "rectified"))


def transformer_folder(model: str) -> str:
    """A diffusers SD3 pipeline folder or its `transformer/` folder -> the `transformer/` folder."""
    inner = os.path.join(model, "transformer")
    if os.path.isfile(os.path.join(inner, "config.json")):
        return inner
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    raise ConversionError(f"{model}: neither a diffusers SD3 folder with transformer/ nor a transformer folder")


def check_base(folder: str, transformer_config: dict) -> dict:
    """The base transformer's raw config.json; ConversionError naming it when it differs from the checkpoint's."""
    raw, path = sd3_transformer.read_config(folder)
    with open(path) as f:
        raw = json.load(f)
    want = sd3_transformer.normalize_config(transformer_config, "checkpoint transformer_config")
    have = sd3_transformer.normalize_config(raw, path)
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        lines = ", ".join(f"{k}: base {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        raise ConversionError(f"{path}: transformer config differs from the checkpoint's ({lines})")
    return raw


def _readme(meta: dict, base: str, step: int, fused: bool, scale: float, files: dict[str, str]) -> str:
    config = meta["config"]
    n, shift, kind = student_schedule(config)
    sig = rectified_sigmas(n, shift)
    lora = config["lora"]
    d = config.get("distill", {})
    loss = config.get("loss", {})
    if kind != "rectified":
        note = (
            f"Note: this student was distilled on diffusers' default `{kind}` grid, not the rectified one: sample it "
            f"with `num_inference_steps={n}` and no `sigmas=` (the rectified recipe below is for rectified runs)."
        )
    else:
        note = ""
    lines = [
        "# FlowSteer student (exported from flowsteer-jax)",
        "",
        f"- base model: `{base}`",
        f"- training step: {step}",
        f"- LoRA: rank {lora['rank']}, alpha {lora['alpha']} (scale {scale:g}, folded into `lora_B`), "
        f"targets {list(lora.get('targets', []))}",
        f"- distillation: {n} segments, {kind} schedule, shift {shift:g}, start points {d.get('start_points', '?')}, "
        f"teacher steps {d.get('teacher_steps', '?')}, CFG {d.get('cfg_min', '?')}-{d.get('cfg_max', '?')}, "
        f"lambda_adv {loss.get('lambda_adv', '?')}, lambda_fm {loss.get('lambda_fm', '?')}",
        "",
        *(
            [f"`{PEFT_FILE}` holds PEFT/diffusers LoRA keys (no alpha keys: scale 1 as loaded)."]
            if "lora" in files
            else []
        ),
        *(
            [
                f"`{COMFYUI_FILE}` holds the same LoRA for ComfyUI (kohya-style `lora_transformer_<module>.lora_down/"
                f"lora_up.weight` and `.alpha` = {lora['alpha']}, scale alpha / rank)."
            ]
            if "comfyui_lora" in files
            else []
        ),
        *(["`transformer/` is the base transformer with the LoRA merged in."] if fused else []),
        f"`{EXPORT_RECORD}` records the checkpoint step, workdir and base model (with its weights fingerprint).",
        "",
        f"## Sampling in diffusers ({n} steps, no guidance, the rectified schedule)",
        "",
        f"The student was trained for the sigmas `shift(linspace(1, 0, {n + 1}))` with shift {shift:g}: "
        f"`{[round(s, 6) for s in sig] + [0.0]}`. diffusers' scheduler shifts the `sigmas=` it is given, so set its "
        "shift to 1 and pass the already shifted values (its default spacing would waste the last step):",
        "",
        *([note, ""] if note else []),
        "```python",
        "import torch",
        "from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline",
        "",
        f'pipe = StableDiffusion3Pipeline.from_pretrained("{base}", torch_dtype=torch.float16)',
        'pipe.load_lora_weights("path/to/this/folder")',
    ]
    if fused:
        lines += [
            "# or, instead of load_lora_weights, the merged transformer:",
            "# from diffusers import SD3Transformer2DModel",
            '# pipe.transformer = SD3Transformer2DModel.from_pretrained("path/to/this/folder/transformer",'
            " torch_dtype=torch.float16)",
        ]
    lines += [
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)",
        f"sigmas = {sig}",
        f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=0.0, sigmas=sigmas).images[0]',
        "```",
        "",
        f"Equivalently set the scheduler's shift to {shift:g} (SD3's default is 3) and pass the unshifted "
        f"`sigmas={rectified_sigmas(n, 1.0)}`.",
        "",
        "In flowsteer-jax: `SD3Pipeline.from_pretrained(base).load_lora(folder)`, then "
        f'`pipe(prompts, num_inference_steps={n}, guidance_scale=0.0, schedule="rectified")`.',
        "",
    ]
    return "\n".join(lines)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _checked_fingerprint(meta: dict, base_folder: str, step_dir: str, model: str | None) -> str:
    """The base transformer's `weights_fingerprint`; InputError when the checkpoint recorded another one, a
    one-line warning when it recorded none (a checkpoint from before `base_fingerprint`)."""
    have = weights_fingerprint(base_folder)
    want = meta.get("base_fingerprint")
    trained_on = meta.get("model_path") or "(not recorded)"
    if want is None:
        print(
            f"{PROG}: warning: {step_dir}/meta records no base_fingerprint (an older checkpoint): cannot check that "
            f"{base_folder} holds the weights the LoRA was trained on",
            file=sys.stderr,
        )
    elif want != have:
        raise InputError(
            f"{base_folder}: its weights differ from the ones the LoRA was trained on ({trained_on}): fingerprint "
            f"{have} vs {want} recorded in {step_dir}/meta; pass --model=<the base it was trained on>"
        )
    return have


def export(
    checkpoint: str,
    out: str,
    *,
    step: int | None = None,
    do_fuse: bool = False,
    dtype: str | None = None,
    model: str | None = None,
    max_shard_bytes: int | None = 10 * 2**30,
    fmt: str = "both",
    overwrite: bool = False,
    ema: bool = True,
) -> dict[str, str]:
    """Write the LoRA file(s), with `do_fuse` the merged `transformer/`, README.md and export.json into `out`.

    `fmt`: `peft`, `comfyui` or `both`. Never overwrites: `out` must be absent or empty unless `overwrite`, and is
    never a protected folder nor an input (`outputs.check_output`). Everything is staged and renamed into place at
    the end (an old `out` is replaced whole, `outputs.Output`). Returns the written paths (under `out`).
    """
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    dtypes = _dtypes()
    if dtype is not None and dtype not in dtypes:
        raise ConversionError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        directory, step = resolve_step(checkpoint, step)
        flat, meta = read_lora(checkpoint, step, ema=ema)
    except CheckpointError as e:  # a step that is absent, incomplete or unreadable: say how to pick another
        if "steps on disk" in str(e) or "available steps" in str(e):
            raise CheckpointError(f"{e} (export another step with --step=N)") from e
        raise
    step_dir = os.path.join(directory, str(step))
    config = meta["config"]
    tconf = meta["transformer_config"]
    table = sd3_transformer.param_table(tconf)
    lora_pairs(flat, table)  # strict: every adapter fits the checkpoint's own transformer config
    alpha, rank = float(config["lora"]["alpha"]), float(config["lora"]["rank"])
    scale = alpha / rank
    named = model
    model = model or meta.get("model_path") or config.get("model", {}).get("path") or None
    base_folder = None
    if named or do_fuse:  # a base we were told to use (or need) must be there
        if not model:
            raise ConversionError(f"{checkpoint}: --fuse needs the base model; the checkpoint names none, pass --model")
        base_folder = transformer_folder(model)
    elif model and os.path.isdir(model):  # the recorded base, when this machine has it: check it too
        try:
            base_folder = transformer_folder(model)
        except ConversionError:
            base_folder = None
    inputs = [checkpoint, model, base_folder, meta.get("model_path")]
    outputs.check_output(out, PROG, overwrite=None, inputs=inputs)  # never the base: before anything else
    raw_base = check_base(base_folder, tconf) if base_folder is not None else None
    outputs.check_output(out, PROG, overwrite=overwrite, inputs=inputs)
    if do_fuse:
        fingerprint = _checked_fingerprint(meta, base_folder, step_dir, model)
    else:  # only recorded: the LoRA file does not hold the base
        try:
            fingerprint = weights_fingerprint(base_folder) if base_folder is not None else None
        except ConversionError:
            fingerprint = None

    files: dict[str, str] = {}
    output = outputs.prepare_output(out, PROG, overwrite=overwrite, inputs=inputs)
    tmp = output.dir
    with output, cli.log_to(output.log_file):
        if fmt in ("peft", "both"):
            peft = to_peft(flat, scale, table, dtype=dtypes[dtype or "fp32"])
            save_checkpoint(peft, tmp, name=PEFT_FILE[: -len(".safetensors")], max_shard_bytes=None)
            files["lora"] = PEFT_FILE
        if fmt in ("comfyui", "both"):
            comfy = to_comfyui(flat, alpha, table, dtype=dtypes[dtype or "fp32"])
            save_checkpoint(comfy, tmp, name=COMFYUI_FILE[: -len(".safetensors")], max_shard_bytes=None)
            files["comfyui_lora"] = COMFYUI_FILE
        if do_fuse:
            ckpt = open_checkpoint(base_folder)
            check_checkpoint(ckpt, table, os.path.join(base_folder, "config.json"))
            base_sd = {k: ckpt.load(k) for k in ckpt.keys()}
            out_dtype = None if dtype is None else dtypes[dtype]
            fused = fuse(base_sd, flat, scale, table, dtype=out_dtype)
            if out_dtype is not None:  # every weight in one dtype (merged ones already are)
                fused = {k: v.astype(out_dtype, copy=False) for k, v in fused.items()}
            save_checkpoint(fused, os.path.join(tmp, "transformer"), max_shard_bytes=max_shard_bytes)
            with open(os.path.join(tmp, "transformer", "config.json"), "w") as f:
                json.dump(raw_base, f, indent=2)
            files["transformer"] = "transformer"
        base_name = model or "path/to/stable-diffusion-3"
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(meta, base_name, int(meta.get("step", step)), do_fuse, scale, files))
        files["readme"] = "README.md"
        record = {
            "step": int(meta.get("step", step)),
            "checkpoint": _real(checkpoint),
            "checkpoint_step_dir": _real(step_dir),
            "base_model": _real(model) if model else None,
            "base_fingerprint": fingerprint,
            "trained_base_fingerprint": meta.get("base_fingerprint"),
            "lora": {"rank": int(rank), "alpha": alpha, "scale": scale},
            "weights": "ema" if ema and uses_ema(meta) else "raw",
            "format": fmt,
            "dtype": dtype,
            "fused": do_fuse,
            "files": sorted(files.values()),
        }
        with open(os.path.join(tmp, EXPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2)
        files["record"] = EXPORT_RECORD
        output.commit()
    return {what: os.path.join(out, name) for what, name in files.items()}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir (with checkpoints/)", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "output folder", flag_values=fv, required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_bool("fuse", False, "also write transformer/ with the LoRA merged in", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["bf16", "fp16", "fp32"], "LoRA (and fused transformer) dtype", flag_values=fv)
    flags.DEFINE_string("model", None, "base diffusers SD3 folder (default: the checkpoint's)", flag_values=fv)
    flags.DEFINE_integer("max_shard_bytes", 10 * 2**30, "shard the fused transformer above this", flag_values=fv)
    flags.DEFINE_enum(
        "format", "both", list(FORMATS), "LoRA file layout(s): PEFT/diffusers, ComfyUI/kohya", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --out (all of it)", flag_values=fv)
    flags.DEFINE_bool("ema", True, "the run's EMA weights when it kept one (--noema: the trained ones)", flag_values=fv)


def parse_args(argv: list[str] | None = None):
    return cli.parse(define_flags, argv, prog=PROG, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        written = export(
            args.checkpoint,
            args.out,
            step=args.step,
            do_fuse=args.fuse,
            dtype=args.dtype,
            model=args.model,
            max_shard_bytes=args.max_shard_bytes,
            fmt=args.format,
            overwrite=args.overwrite,
            ema=args.ema,
        )
        for what, path in written.items():
            print(f"wrote {what}: {path}")
        return 0

    return cli.run(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
