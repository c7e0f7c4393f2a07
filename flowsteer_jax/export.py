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

import datetime
import hashlib
import json
import os
import re
import sys

import numpy as np
from absl import flags

from conversion import sd3_transformer
from conversion.errors import InputError
from conversion.lora import (
    COMFYUI_FILE,
    LORA_ADAPTER_METADATA_KEY,
    PEFT_FILE,
    PREFIX,
    fuse,
    lora_pairs,
    to_comfyui,
    to_peft,
    torch_module,
)
from conversion.safetensors_io import ConversionError, open_checkpoint, save_checkpoint, weights_fingerprint
from conversion.table import check_checkpoint
from conversion.training_checkpoint import CheckpointError, read_lora, resolve_step, uses_ema
from flowsteer_jax import cli, outputs
from flowsteer_jax.flow import schedules

PROG = "flowsteer_jax.export"
FORMATS = ("peft", "comfyui", "both")
EXPORT_RECORD = "export.json"  # what the folder was exported from
WORKFLOW_FILE = "workflow.json"  # the ComfyUI workflow (API format)
PAPER = "FlowSteer (Ke et al., CVPR 2026)"
MODELSPEC_VERSION = "1.0.0"  # Stability AI's ModelSpec (github.com/Stability-AI/ModelSpec), `modelspec.*` keys
# ComfyUI's ModelSamplingDiscreteFlow keeps this many discrete sigmas; its "simple" scheduler picks every
# (1000 / steps)-th one (comfy/samplers.py::simple_scheduler), so it lands on our grid when steps divides it.
COMFYUI_TIMESTEPS = 1000
# The published SD3-family transformers, told apart by their config.json (the export imports no model code, so
# not models/presets.py): (num_layers, caption_projection_dim, qk_norm, dual attention layers) -> the ModelSpec
# architecture (kohya sd-scripts' `stable-diffusion-3-<variant>` ids), the hub id, and the all-in-one checkpoint
# file ComfyUI loads with CheckpointLoaderSimple.
KNOWN_BASES = {
    (24, 1536, None, False): (
        "stable-diffusion-3-m",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "sd3_medium_incl_clips_t5xxlfp8.safetensors",
    ),
    (38, 2432, "rms_norm", False): (
        "stable-diffusion-3-5-large",
        "stabilityai/stable-diffusion-3.5-large",
        "sd3.5_large_fp8_scaled.safetensors",
    ),
}
SD3_LICENSE = ("stabilityai-ai-community", "https://stability.ai/community-license-agreement")


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


def known_base(transformer_config: dict) -> tuple[str, str | None, str | None]:
    """(ModelSpec architecture, hub id or None, ComfyUI checkpoint file or None) of a base, from its config.json:
    a published SD3-family shape, else the generic `stable-diffusion-3` and None (a fine-tune of a published
    model has its shape, so the hub id is only a guess for the card's base_model: `base_model_id` decides that)."""
    c = transformer_config
    key = (c.get("num_layers"), c.get("caption_projection_dim"), c.get("qk_norm"), bool(c.get("dual_attention_layers")))
    return KNOWN_BASES.get(key, ("stable-diffusion-3", None, None))


def base_model_id(model: str | None, given: str | None) -> str | None:
    """The base's hub id for the model card: `given` (`--base_model`), else read from a hub cache path
    (`.../models--ORG--NAME/snapshots/<rev>`), else None (a local folder: the card then names no base_model)."""
    if given:
        return given
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", _real(model) + "/") if model else None
    return f"{match.group(1)}/{match.group(2)}" if match else None


def config_hash(config: dict) -> str:
    """16 hex digits of the sha256 of the run config as canonical JSON: the same runs hash the same."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def student_grid(config: dict) -> list[float]:
    """The `n + 1` sigmas the student was distilled for (its schedule kind and shift), ending at 0, each the
    shortest decimal of its float32."""
    n, shift, kind = student_schedule(config)
    return [float(str(x)) for x in schedules.sigmas(n, kind, shift)]


def resolution(transformer_config: dict) -> int:
    """The base's native image side: `sample_size` latents times SD3's VAE factor 8."""
    return int(transformer_config["sample_size"]) * 8


def usage_hint(config: dict) -> str:
    """One line: steps, sampler, guidance and the exact sigmas, for people and tools (`modelspec.usage_hint`)."""
    n, shift, kind = student_schedule(config)
    grid = student_grid(config)
    if kind == "rectified":
        how = f"diffusers: scheduler shift=1.0 and sigmas={grid[:-1]}"
    else:
        how = f"diffusers: the default scheduler (shift {shift:g}), no sigmas="
    return f"{n} steps, Euler, CFG off (guidance 1), sigmas {grid} ({kind} grid, shift {shift:g}); {how}"


def file_metadata(meta: dict, step: int, *, base_id: str | None, adapter: dict | None, title: str) -> dict[str, str]:
    """The `__metadata__` of an exported safetensors file: ModelSpec keys, the sampling recipe, provenance, and
    for a LoRA (`adapter`: `{"r", "lora_alpha", "target_modules"}`) diffusers' `lora_adapter_metadata`."""
    config = meta["config"]
    tconf = meta["transformer_config"]
    n, shift, kind = student_schedule(config)
    arch, _, _ = known_base(tconf)
    side = resolution(tconf)
    saved = meta.get("time")
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch + ("/lora" if adapter is not None else ""),
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.description": f"A {n}-step student of {base_id or 'an SD3-family model'} distilled with {PAPER}.",
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.usage_hint": usage_hint(config),
        "flowsteer.steps": str(n),
        "flowsteer.schedule": kind,
        "flowsteer.shift": f"{shift:g}",
        "flowsteer.sigmas": json.dumps(student_grid(config)),
        "flowsteer.guidance_scale": "1.0",
        "flowsteer.step": str(step),
        # the weights it was trained on (recorded by training), not whichever base this export found
        "flowsteer.base_fingerprint": str(meta.get("base_fingerprint") or "unrecorded"),
        "flowsteer.config_sha256": config_hash(config),
        "flowsteer.commit": str(meta.get("commit") or "unrecorded"),
    }
    if saved is not None:  # the checkpoint's save time, so the same checkpoint exports the same bytes
        out["modelspec.date"] = datetime.datetime.fromtimestamp(float(saved), datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    if known_base(tconf)[1] is not None:
        out["modelspec.license"] = SD3_LICENSE[0]
    if adapter is not None:
        packed = {PREFIX + k: v for k, v in adapter.items()}
        out[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    return out


def comfyui_workflow(config: dict, tconf: dict, lora_file: str, prompt: str = "a photo of a cat") -> dict | None:
    """ComfyUI's API-format workflow for the student: the base checkpoint, the LoRA, ModelSamplingSD3 at the
    run's shift, KSampler with `n` Euler steps, CFG 1 and the "simple" scheduler, decode and save.

    Node and input names are ComfyUI's (nodes.py, comfy_extras/nodes_model_advanced.py, nodes_sd3.py). "simple"
    on ModelSamplingSD3(shift) gives `shift(t)` at `t = (1000 - int(k * 1000 / n)) / 1000`, `k < n`, then 0: our
    rectified grid when `n` divides 1000 (within float32 rounding, bit for bit at 4 steps and shift 3;
    tests/test_export.py checks it with ComfyUI's formula). None when no ComfyUI scheduler reproduces the
    student's grid (another `n`, or the diffusers schedule)."""
    n, shift, kind = student_schedule(config)
    if kind != "rectified" or COMFYUI_TIMESTEPS % n:
        return None
    _, _, ckpt = known_base(tconf)
    side = resolution(tconf)

    def node(class_type: str, title: str, **inputs) -> dict:
        return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("CheckpointLoaderSimple", "base checkpoint", ckpt_name=ckpt or "sd3_base_checkpoint.safetensors"),
        "2": node("LoraLoaderModelOnly", "FlowSteer LoRA", model=["1", 0], lora_name=lora_file, strength_model=1.0),
        "3": node("ModelSamplingSD3", "rectified grid shift", model=["2", 0], shift=shift),
        "4": node("CLIPTextEncode", "prompt", text=prompt, clip=["1", 1]),
        "5": node("CLIPTextEncode", "negative (unused at CFG 1)", text="", clip=["1", 1]),
        "6": node("EmptySD3LatentImage", "latent", width=side, height=side, batch_size=1),
        "7": node(
            "KSampler",
            f"{n} steps, CFG 1",
            model=["3", 0],
            seed=0,
            steps=n,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            positive=["4", 0],
            negative=["5", 0],
            latent_image=["6", 0],
            denoise=1.0,
        ),
        "8": node("VAEDecode", "decode", samples=["7", 0], vae=["1", 2]),
        "9": node("SaveImage", "save", images=["8", 0], filename_prefix="flowsteer"),
    }


def read_results(path: str, checkpoint: str, step: int, fingerprint: str | None) -> list[dict]:
    """The rows of an evaluate `results.json` (or its folder) for this checkpoint step (sampled with
    `--lora=<this workdir>` when this was its newest step: `lora_step`), plus its base model's rows (no LoRA, same
    weights fingerprint) for comparison. InputError naming the file when it is unreadable or holds no row of this
    checkpoint step."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--results={path}: cannot read evaluate results from {file} ({e})") from e
    ours, base = [], []
    for row in rows:
        prov = row.get("provenance", {})
        sampling = prov.get("sampling", {})
        if "lora" not in sampling:  # an image-folder row: not sampled from a model
            continue
        if sampling["lora"] is None:
            if fingerprint is not None and prov.get("transformer_fingerprint") == fingerprint:
                base.append(row)
        elif _real(sampling["lora"]) == _real(checkpoint) and sampling.get("lora_step") == step:
            ours.append(row)
    if not ours:
        labels = [r.get("label") for r in rows]
        raise InputError(
            f"--results={file}: no row evaluates {checkpoint} at step {step} (rows: {labels}); evaluate it with "
            f"--lora={checkpoint}, or export the step that was evaluated with --step"
        )
    return base + ours


def results_table(rows: list[dict]) -> str:
    """Markdown `| method | NFE | metric ... |` of evaluate rows (columns: every metric some row has)."""
    keys = sorted({k for r in rows for k in r.get("metrics", {})})
    lines = ["| method | NFE | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = [r["metrics"].get(k) for k in keys]
        shown = ["—" if v is None or v != v else f"{v:.4g}" for v in cells]
        lines.append(f"| {r['label']} | {r.get('nfe', '—')} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def front_matter(tconf: dict, base_id: str | None) -> str:
    """The model card's YAML front matter, as the hubs' card tools parse it (huggingface_hub ModelCardData)."""
    _, known_id, _ = known_base(tconf)
    lines = ["---"]
    if base_id:
        lines += [f"base_model: {base_id}", "base_model_relation: adapter"]
    lines += ["library_name: diffusers", "pipeline_tag: text-to-image"]
    if known_id is not None:  # a published SD3-family shape: its licence binds the adapter too
        lines += ["license: other", f"license_name: {SD3_LICENSE[0]}", f"license_link: {SD3_LICENSE[1]}"]
    lines += ["tags:", *(f"- {t}" for t in ("text-to-image", "diffusers", "lora", "sd3", "flowsteer", "few-step"))]
    lines += ["---", ""]
    return "\n".join(lines)


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


def _readme(
    meta: dict,
    base: str,
    step: int,
    fused: bool,
    scale: float,
    files: dict[str, str],
    base_id: str | None = None,
    results: list[dict] | None = None,
) -> str:
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
        front_matter(meta["transformer_config"], base_id) + "# FlowSteer student (exported from flowsteer-jax)",
        "",
        f"A {n}-step student distilled with {PAPER}, reimplemented in JAX by flowsteer-jax. It is a LoRA on its "
        "base model, sampled without classifier-free guidance on the grid below; on another grid (the scheduler's "
        "default spacing, or guidance on) it comes out blurry.",
        "",
        f"- base model: `{base}`" + (f" (`{base_id}`)" if base_id and base_id != base else ""),
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
        *(
            [
                f"`{WORKFLOW_FILE}` is a ComfyUI workflow (API format: load it in ComfyUI, or POST it to `/prompt`): "
                f"the base checkpoint, this LoRA, ModelSamplingSD3 shift {shift:g}, KSampler {n} steps euler / "
                "simple, CFG 1 (the same grid), decode and save. Put the LoRA file in `models/loras/` and pick "
                "your base's all-in-one checkpoint in the loader."
            ]
            if "workflow" in files
            else []
        ),
        f"`{EXPORT_RECORD}` records the checkpoint step, workdir and base model (with its weights fingerprint). "
        "Every safetensors file carries the same facts in its metadata (`modelspec.*`, `flowsteer.*`, and for the "
        "LoRA files diffusers' `lora_adapter_metadata`: rank, alpha, target modules).",
        "",
        *(["## Evaluation", "", results_table(results), ""] if results else []),
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
        f'pipe = StableDiffusion3Pipeline.from_pretrained("{base_id or base}", torch_dtype=torch.float16)',
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
        "## Reference",
        "",
        f"{PAPER}: few-step distillation of Stable Diffusion 3. This export: step {step} of the run, config sha256 "
        f"`{config_hash(config)}`, code commit `{meta.get('commit') or 'unrecorded'}`.",
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
    base_model: str | None = None,
    results: str | None = None,
) -> dict[str, str]:
    """Write the LoRA file(s), with `do_fuse` the merged `transformer/`, README.md and export.json into `out`.

    `fmt`: `peft`, `comfyui` or `both`. Never overwrites: `out` must be absent or empty unless `overwrite`, and is
    never a protected folder nor an input (`outputs.check_output`). Everything is staged and renamed into place at
    the end (an old `out` is replaced whole, `outputs.Output`). `base_model`: the base's hub id for the model card
    (default: read from a hub cache path, else none). `results`: an evaluate `--out` folder (or its results.json)
    whose rows of this checkpoint step go into the card. Returns the written paths (under `out`).
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

    step = int(meta.get("step", step))
    base_id = base_model_id(model, base_model)
    shape_of = known_base(tconf)[1]
    if base_id is None and shape_of is not None:
        print(
            f"{PROG}: note: the model card names no base_model (the base is a local folder); its shape is "
            f"{shape_of}'s: pass --base_model={shape_of} if that is the base",
            file=sys.stderr,
        )
    table_rows = (
        read_results(results, checkpoint, step, meta.get("base_fingerprint") or fingerprint) if results else None
    )
    rank_i = int(rank)
    targets = sorted(torch_module(e) for e, _, _ in lora_pairs(flat, table).values())
    base_label = base_id or (os.path.basename(_real(model)) if model else "an SD3-family model")
    title = f"FlowSteer {student_schedule(config)[0]}-step student of {base_label}, step {step}"

    def metadata(adapter: dict | None) -> dict[str, str]:
        return file_metadata(meta, step, base_id=base_id, adapter=adapter, title=title)

    # ComfyUI's SD3 key map reads both layouts; prefer the kohya-style file, whose alphas it applies.
    workflow = comfyui_workflow(config, tconf, PEFT_FILE if fmt == "peft" else COMFYUI_FILE)

    files: dict[str, str] = {}
    output = outputs.prepare_output(out, PROG, overwrite=overwrite, inputs=inputs)
    tmp = output.dir
    with output, cli.log_to(output.log_file):
        if fmt in ("peft", "both"):
            peft = to_peft(flat, scale, table, dtype=dtypes[dtype or "fp32"])
            # alpha = rank: the scale is folded into lora_B, so diffusers, PEFT and ComfyUI (with or without
            # reading this) all apply the strength we trained with.
            adapter = {"r": rank_i, "lora_alpha": rank_i, "target_modules": targets}
            save_checkpoint(
                peft, tmp, name=PEFT_FILE[: -len(".safetensors")], max_shard_bytes=None, metadata=metadata(adapter)
            )
            files["lora"] = PEFT_FILE
        if fmt in ("comfyui", "both"):
            comfy = to_comfyui(flat, alpha, table, dtype=dtypes[dtype or "fp32"])
            adapter = {"r": rank_i, "lora_alpha": alpha, "target_modules": targets}  # as its `.alpha` keys say
            save_checkpoint(
                comfy, tmp, name=COMFYUI_FILE[: -len(".safetensors")], max_shard_bytes=None, metadata=metadata(adapter)
            )
            files["comfyui_lora"] = COMFYUI_FILE
        if do_fuse:
            ckpt = open_checkpoint(base_folder)
            check_checkpoint(ckpt, table, os.path.join(base_folder, "config.json"))
            base_sd = {k: ckpt.load(k) for k in ckpt.keys()}
            out_dtype = None if dtype is None else dtypes[dtype]
            fused = fuse(base_sd, flat, scale, table, dtype=out_dtype)
            if out_dtype is not None:  # every weight in one dtype (merged ones already are)
                fused = {k: v.astype(out_dtype, copy=False) for k, v in fused.items()}
            save_checkpoint(
                fused, os.path.join(tmp, "transformer"), max_shard_bytes=max_shard_bytes, metadata=metadata(None)
            )
            with open(os.path.join(tmp, "transformer", "config.json"), "w") as f:
                json.dump(raw_base, f, indent=2)
            files["transformer"] = "transformer"
        if workflow is not None:
            with open(os.path.join(tmp, WORKFLOW_FILE), "w") as f:
                json.dump(workflow, f, indent=2)
            files["workflow"] = WORKFLOW_FILE
        base_name = model or "path/to/stable-diffusion-3"
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(meta, base_name, step, do_fuse, scale, files, base_id, table_rows))
        files["readme"] = "README.md"
        record = {
            "step": step,
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
    flags.DEFINE_string(
        "base_model", None, "the base's hub id for the model card (default: from a hub cache path)", flag_values=fv
    )
    flags.DEFINE_string(
        "results", None, "evaluate --out folder whose rows of this checkpoint go into the model card", flag_values=fv
    )


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
            base_model=args.base_model,
            results=args.results,
        )
        for what, path in written.items():
            print(f"wrote {what}: {path}")
        return 0

    return cli.run(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
