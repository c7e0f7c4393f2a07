"""The digits world as the trainer sees it (`config.world = "digits"`), and its end-of-run report.

`make_world(config, workdir)` pretrains the teacher if `digits.teacher_dir` (default `WORKDIR/teacher`) has
none, and hands `train.py` the same things an SD3 folder gives it: the teacher's diffusers `transformer/`
folder, prompts (a fixed pool of training-split pairs; their real images are PeRFlow's `x0`), the SD3
conditioning path of the world's encoders, and an identity "VAE". After training, `report` samples the
fixed evaluation set with the teacher (28 and 4 steps) and the student (4 steps), scores them
(`evaluate.py`) and writes `report.md`, `metrics.json`, `samples/<name>.npz` and PNG grids.
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType

import ml_collections
import numpy as np
from flax import nnx

from flowsteer_jax.digits import data, evaluate, teacher, text
from flowsteer_jax.images import save_grid
from flowsteer_jax.models.loading import load_transformer
from flowsteer_jax.worlds import Lab, World

GRID = 32  # evaluation samples shown in each PNG grid (the first of the fixed evaluation set)
TOY_WORLDS = ("digits", "digits_compose")  # worlds with their own metrics (`evaluate --digits`) and ablation


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.digits.teacher_dir or os.path.join(workdir, "teacher")


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str) -> str:
    folder = teacher_dir(config, workdir)
    if not teacher.is_complete(folder):
        d = config.digits
        teacher.pretrain_teacher(
            folder,
            steps=int(d.teacher_train_steps),
            batch_size=int(d.teacher_batch_size),
            seed=int(d.teacher_seed),
            text_seed=int(d.text_seed),
        )
    return folder


def share_models(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Point `config` at the models an ablation's runs share (`WORKDIR/teacher`)."""
    config.digits.teacher_dir = os.path.join(workdir, "teacher")


def lab(config: ml_collections.ConfigDict, workdir: str, seed: int) -> Lab:
    """The teacher (pretrained if absent) and the evaluation set of `seed` (noise `EVAL_SEED + seed`)."""
    d = config.digits
    model = load_transformer(ensure_teacher(config, workdir))
    ev = evaluate.eval_set(int(d.eval_samples), seed=evaluate.EVAL_SEED + seed)
    real = data.sample_pairs(np.random.default_rng(seed), len(ev.digits), "train", digits=ev.digits)
    return Lab(
        model=model,
        cond=text.encode_with_uncond(ev.prompts, seed=int(d.text_seed)),
        noise=ev.noise,
        x0=real.images,
        decode=lambda z: np.asarray(data.to_unit(np.asarray(z, np.float32))),
        score=lambda images, ref: evaluate.evaluate(images, ev.digits, ref),
        save=lambda path, images: evaluate.save_samples(path, images, ev.digits),
        guidance=float(d.teacher_guidance),
    )


def make_world(config: ml_collections.ConfigDict, workdir: str) -> World:
    d = config.digits
    folder = ensure_teacher(config, workdir)
    pool = data.sample_pairs(np.random.default_rng(int(d.pool_seed)), int(d.pool_size), "train")

    def encode(prompts: list[str]) -> dict[str, np.ndarray]:
        embeds, pooled = text.encode(prompts, seed=int(d.text_seed))
        return {"prompt_embeds": embeds, "pooled": pooled}

    ev = evaluate.eval_set(16, seed=int(config.eval.seed))
    return World(
        model_path=os.path.abspath(folder),
        transformer_folder=folder,
        prompts=pool.prompts,
        encode=encode,
        decode=lambda latents: np.asarray(data.to_unit(np.asarray(latents, np.float32))),
        latent_shape=data.IMAGE_SHAPE,
        x0=lambda idx: pool.images[idx],
        eval_prompts=ev.prompts,
        score=lambda images: {"accuracy": float((evaluate.classify(images) == ev.digits).all(1).mean())},
        finish=report,
        fingerprint=f"digits-text{d.text_seed}-pool{d.pool_seed}-{d.pool_size}",
        config_section="digits",
        config_folders=("digits.teacher_dir",),
    )


def _samples(name: str, workdir: str, make, eval_digits: np.ndarray, cache: str | None) -> np.ndarray:
    """Images for `name` (written to `samples/<name>.npz` and `.png`): read from `cache` if it holds them for
    these prompts (the teacher's never change: the ablation's runs share them), else `make()`."""
    images = None
    if cache and os.path.isfile(cache):
        with np.load(cache) as f:
            if np.array_equal(f["digits"], eval_digits):
                images = f["images"]
    if images is None:
        images = np.asarray(make(), np.float32)[..., 0]
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            evaluate.save_samples(cache, images, eval_digits)
    evaluate.save_samples(os.path.join(workdir, "samples", f"{name}.npz"), images, eval_digits)
    save_grid(os.path.join(workdir, "samples", f"{name}.png"), images[:GRID, ..., None], cols=8, scale=8)
    return images


def eval_prompts_of(config: ml_collections.ConfigDict) -> list[str]:
    """The report's evaluation prompts, in sample order."""
    return evaluate.eval_set(int(config.digits.eval_samples), seed=evaluate.EVAL_SEED).prompts


def evaluate_models(config: ml_collections.ConfigDict, workdir: str, student: nnx.Module | None) -> dict:
    """Sample and score the teacher rows (and the student when given) on the fixed evaluation set."""
    d = config.digits
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    ev = evaluate.eval_set(int(d.eval_samples), seed=evaluate.EVAL_SEED)
    cond = text.encode_with_uncond(ev.prompts, seed=int(d.text_seed))
    folder = teacher_dir(config, workdir)
    base = load_transformer(folder)
    shift, w = float(config.distill.shift), float(d.teacher_guidance)
    rows = {  # name -> (model, steps, schedule, guidance)
        "teacher_28_diffusers": (base, 28, "diffusers", w),
        "teacher_4_diffusers": (base, 4, "diffusers", w),
        "teacher_4_rectified": (base, 4, "rectified", w),
        "teacher_4_rectified_nocfg": (base, 4, "rectified", 0.0),  # the student's budget: 4 NFE
    }
    if student is not None:
        k = int(config.distill.num_segments)
        rows[f"student_{k}"] = (student, k, config.distill.schedule, 0.0)
    images, metrics = {}, {}
    for name, (model, steps, schedule, guidance) in rows.items():

        def make(model=model, steps=steps, schedule=schedule, guidance=guidance):
            return evaluate.sample(
                model, cond, ev.noise, steps=steps, schedule=schedule, shift=shift, guidance=guidance
            )

        cache = None
        if model is base:
            cache = os.path.join(folder, "samples", f"{name}_w{guidance:g}_shift{shift:g}_n{len(ev.prompts)}.npz")
        images[name] = _samples(name, workdir, make, ev.digits, cache)
        nfe = steps * (2 if guidance > 1 else 1)
        ref = None if name == "teacher_28_diffusers" else images["teacher_28_diffusers"]
        metrics[name] = {
            **evaluate.evaluate(images[name], ev.digits, ref),
            "nfe": nfe,
            "steps": steps,
            "schedule": schedule,
            "guidance": guidance,
        }
    return metrics


REPORT_ROWS = {
    "teacher_28_diffusers": "teacher, 28 steps, diffusers schedule, CFG",
    "teacher_4_diffusers": "teacher, 4 steps, diffusers schedule, CFG",
    "teacher_4_rectified": "teacher, 4 steps, rectified schedule, CFG",
    "teacher_4_rectified_nocfg": "teacher, 4 steps, rectified schedule, no CFG",
}
# The digits world's columns in `flowsteer_jax.evaluate`'s table: (metric key, header, format).
COLUMNS = (
    ("accuracy", "prompt accuracy", lambda v: f"{v:.3f}"),
    ("fd", "FD (classifier features)", lambda v: f"{v:.2f}"),
    ("mse_to_reference", "MSE to teacher-28", lambda v: f"{v:.4f}"),
)


def report_rows(metrics: dict) -> list[dict]:
    """`evaluate_models`' metrics as `flowsteer_jax.evaluate` rows (label, NFE as steps x passes, metrics)."""
    from flowsteer_jax.evaluate import nfe

    rows = []
    for name, m in metrics.items():
        label = REPORT_ROWS.get(name) or f"FlowSteer student, {m['steps']} steps, no CFG"
        keep = {k: v for k, v in m.items() if k not in ("nfe", "steps", "schedule", "guidance")}
        prov = {"row": name, "schedule": m["schedule"], "guidance": m["guidance"]}
        rows.append({"label": label, "nfe": nfe(m["steps"], m["guidance"]), "metrics": keep, "provenance": prov})
    return rows


def metrics_table(metrics: dict) -> str:
    from flowsteer_jax.evaluate import markdown_table

    return markdown_table(report_rows(metrics), COLUMNS)


def report_header(config: ml_collections.ConfigDict) -> str:
    return (
        "# FlowSteer in the digits world\n\n"
        f"Evaluation: {config.digits.eval_samples} fixed prompts and noises; prompt accuracy = both digits right "
        "(classifier trained on the training split), FD against held-out real pairs."
    )


def read_run(workdir: str) -> tuple[ml_collections.ConfigDict, ModuleType]:
    """A toy-world training workdir's config and its world's module (`evaluate_run`, `COLUMNS`)."""
    from conversion.errors import InputError
    from flowsteer_jax.worlds import WORLDS

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"--digits={workdir}: no config.json (not a training workdir)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("world") not in TOY_WORLDS:
        raise InputError(f"{path}: world={config.get('world')!r}, not a toy-world run (one of {TOY_WORLDS})")
    return config, importlib.import_module(WORLDS[config.world])


def load_student(folder: str, workdir: str) -> nnx.Module:
    """The teacher in `folder` with the run's latest LoRA applied."""
    from conversion.errors import InputError
    from flowsteer_jax.models.loading import read_lora
    from flowsteer_jax.models.lora import set_lora

    if not teacher.is_complete(folder):
        raise InputError(f"{folder}: no complete teacher (train the run first)")
    student = load_transformer(folder)
    set_lora(student, *read_lora(workdir, student.config))
    return student


def evaluate_run(workdir: str, config: ml_collections.ConfigDict) -> tuple[list[dict], str]:
    """`python -m flowsteer_jax.evaluate --digits=WORKDIR`: the teacher rows and the run's latest student, scored
    as the trainer's report does; (rows for `flowsteer_jax.evaluate`, the report's header)."""
    metrics = evaluate_models(config, workdir, load_student(teacher_dir(config, workdir), workdir))
    return report_rows(metrics), report_header(config)


def report(config: ml_collections.ConfigDict, workdir: str, student: nnx.Module, stats: dict) -> dict:
    """Evaluate, then write `metrics.json` and `report.md` (called by the trainer at the end of the run)."""
    metrics = evaluate_models(config, workdir, student)
    tmeta = teacher.teacher_meta(teacher_dir(config, workdir))
    out = {"rows": metrics, "training": stats, "teacher": tmeta}
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(out, f, indent=2)
    d = config.distill
    lines = [
        report_header(config),
        "",
        metrics_table(metrics),
        "",
        f"Distillation: {stats.get('steps')} steps of batch {config.train.batch_size}, {d.num_segments} segments "
        f"({d.schedule} schedule, shift {d.shift}), start points {d.start_points}, teacher CFG "
        f"U[{d.cfg_min}, {d.cfg_max}], lambda_adv {config.loss.lambda_adv}, lambda_fm {config.loss.lambda_fm}; "
        f"{stats.get('seconds', 0):.0f} s ({stats.get('windows_per_s', 0):.1f} trained windows/s).",
        f"Teacher: {tmeta.get('steps', '?')} flow-matching steps of batch {tmeta.get('batch_size', '?')}, "
        f"{tmeta.get('train_seconds', 0):.0f} s to pretrain.",
        "",
        "Grids (first 32 evaluation prompts, same noise in every grid): "
        + ", ".join(f"`samples/{name}.png`" for name in metrics),
    ]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out
