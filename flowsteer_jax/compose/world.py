"""The compositional digits world as the trainer sees it (`config.world = "digits_compose"`), and its report.

`make_world(config, workdir)` trains the VAE (`compose.vae_dir`, default `WORKDIR/vae`) and pretrains the
teacher in its latent space (`compose.teacher_dir`, default `WORKDIR/teacher`) unless they are there, and hands
`train.py` what an SD3 folder gives it: the teacher's diffusers `transformer/` folder, prompts (a fixed pool of
training scenes; their VAE latents are PeRFlow's `x0`), the SD3 conditioning path of the world's encoders, and
the VAE's decoder. After training, `report` samples the fixed evaluation set with the teacher (28 and 4 steps,
with and without CFG) and the student, decodes through the VAE, scores (`evaluate.py`) and writes `report.md`,
`metrics.json` and PNG grids.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from conversion.safetensors_io import folder_fingerprint
from flowsteer_jax.compose import data, evaluate, vae
from flowsteer_jax.digits import teacher, text
from flowsteer_jax.digits.evaluate import sample
from flowsteer_jax.digits.world import report_rows
from flowsteer_jax.images import save_grid
from flowsteer_jax.models.loading import load_transformer, load_vae
from flowsteer_jax.worlds import Lab, World

GRID = 32  # evaluation samples shown in each PNG grid
COLUMNS = (  # (metric key, header, format) for `flowsteer_jax.evaluate.markdown_table`
    ("accuracy", "prompt accuracy", lambda v: f"{v:.3f}"),
    ("identity", "digits", lambda v: f"{v:.3f}"),
    ("count", "count", lambda v: f"{v:.3f}"),
    ("position", "position", lambda v: f"{v:.3f}"),
    ("attribute", "colour", lambda v: f"{v:.3f}"),
    ("fd", "FD", lambda v: f"{v:.2f}"),
    ("mse_to_reference", "MSE to teacher-28", lambda v: f"{v:.4f}"),
)


def language() -> text.Language:
    return text.Language(data.words(), data.all_prompts())


def vae_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.compose.vae_dir or os.path.join(workdir, "vae")


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.compose.teacher_dir or os.path.join(workdir, "teacher")


def _pool_sampler(k_idx: jax.Array, _, batch_size: int, tables) -> tuple[jax.Array, jax.Array]:
    latents, prompt_ids = tables
    idx = jax.random.randint(k_idx, (batch_size,), 0, latents.shape[0])
    return latents[idx], prompt_ids[idx]


def ensure_models(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.Module, data.Scenes, np.ndarray]:
    """(VAE, the training pool's scenes, their latents), training the VAE and the teacher if absent."""
    c = config.compose
    times = {}
    t = time.perf_counter()
    autoencoder = vae.ensure_vae(vae_dir(config, workdir), steps=int(c.vae_train_steps), seed=int(c.vae_seed))
    times["vae"] = time.perf_counter() - t
    t = time.perf_counter()
    pool = training_pool(config)
    latents = vae.encode_latents(autoencoder, pool.images)
    times["pool"] = time.perf_counter() - t
    folder = teacher_dir(config, workdir)
    if not teacher.is_complete(folder):
        t = time.perf_counter()
        embeds, pooled = text.prompt_table(int(c.text_seed), language())
        # The teacher's captions: the pool's as the teacher sees them (`teacher_caption_noise`)
        noise = float(c.teacher_caption_noise)
        ids = pool.prompt_ids if noise == float(c.caption_noise) else training_pool(config, noise).prompt_ids
        source = teacher.DataSource(
            vae.LATENT_SHAPE,
            (jnp.asarray(latents), jnp.asarray(ids)),
            _pool_sampler,
            embeds,
            pooled,
            name="digits_compose" + (f"-captions{noise:g}" if noise else ""),
        )
        teacher.pretrain_teacher(
            folder,
            steps=int(c.teacher_train_steps),
            batch_size=int(c.teacher_batch_size),
            seed=int(c.teacher_seed),
            num_layers=int(c.teacher_layers),
            num_attention_heads=int(c.teacher_heads),
            attention_head_dim=int(c.teacher_head_dim),
            learning_rate=float(c.teacher_lr),
            text_seed=int(c.text_seed),
            source=source,
        )
        times["teacher"] = time.perf_counter() - t
    print("compose world setup seconds:", {k: round(v, 1) for k, v in times.items()}, flush=True)
    return autoencoder, pool, latents


def training_pool(config: ml_collections.ConfigDict, caption_noise: float | None = None) -> data.Scenes:
    """The training scenes: the distillation prompts and PeRFlow's x0 (and the teacher's data). With
    `caption_noise` (default `compose.caption_noise`) a fraction of their captions is corrupted
    (`data.corrupt_captions`: LAION-like captions); `prompt_ids` are then the captions as trained on,
    `cells`/`colours` what the images show. The same scenes at every rate."""
    c = config.compose
    noise = float(c.caption_noise if caption_noise is None else caption_noise)
    pool = data.sample_scenes(np.random.default_rng(int(c.pool_seed)), int(c.pool_size), "train", tasks=c.tasks)
    if noise:
        rng = np.random.default_rng([int(c.pool_seed), 1])
        pool = pool._replace(prompt_ids=data.corrupt_captions(rng, pool.prompt_ids, noise)[0])
    return pool


def pool_x0(pool: data.Scenes, latents: np.ndarray, prompt_ids: np.ndarray, seed: int) -> np.ndarray:
    """PeRFlow's x0 for `prompt_ids`: the latent of a training scene captioned with that prompt, drawn uniformly
    from the (possibly noisy) pool. A prompt the pool never captions is refused."""
    rng = np.random.default_rng([seed, 2])
    order = np.argsort(pool.prompt_ids, kind="stable")
    ids = pool.prompt_ids[order]
    lo, hi = np.searchsorted(ids, prompt_ids, "left"), np.searchsorted(ids, prompt_ids, "right")
    if np.any(hi == lo):
        missing = sorted(set(np.asarray(prompt_ids)[hi == lo].tolist()))
        raise ValueError(f"the training pool has no scene captioned {[data.all_prompts()[i] for i in missing][:3]}")
    pick = lo + (rng.random(len(lo)) * (hi - lo)).astype(np.int64)
    return latents[order[pick]]


def share_models(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Point `config` at the models an ablation's runs share (`WORKDIR/vae`, `WORKDIR/teacher`)."""
    config.compose.vae_dir = config.compose.vae_dir or os.path.join(workdir, "vae")
    config.compose.teacher_dir = os.path.join(workdir, "teacher")


def lab(config: ml_collections.ConfigDict, workdir: str, seed: int) -> Lab:
    """The teacher (VAE and teacher trained if absent) and the evaluation set of `seed` (`EVAL_SEED + seed`)."""
    c = config.compose
    autoencoder, pool, latents = ensure_models(config, workdir)
    ev = evaluate.eval_set(int(c.eval_samples), vae.LATENT_SHAPE, seed=evaluate.EVAL_SEED + seed, tasks=c.tasks)
    if c.caption_noise:  # PeRFlow's x0 as it trains on them: pool scenes under the (noisy) caption
        x0 = pool_x0(pool, latents, ev.prompt_ids, seed)
    else:
        real = data.sample_scenes(np.random.default_rng(seed), len(ev.prompt_ids), "train", prompt_ids=ev.prompt_ids)
        x0 = vae.encode_latents(autoencoder, real.images)
    return Lab(
        model=load_transformer(teacher_dir(config, workdir)),
        cond=text.encode_with_uncond(ev.prompts, seed=int(c.text_seed), language=language()),
        noise=ev.noise,
        x0=x0,
        decode=lambda z: vae.decode(autoencoder, z),
        score=lambda images, ref: evaluate.evaluate(images, ev.prompt_ids, ref, tasks=c.tasks),
        correct=lambda images: evaluate.correct(images, ev.prompt_ids),
        save=lambda path, images: _save(path, images, ev.prompt_ids),
        guidance=float(c.teacher_guidance),
    )


def make_world(config: ml_collections.ConfigDict, workdir: str) -> World:
    c = config.compose
    autoencoder, pool, latents = ensure_models(config, workdir)
    lang = language()

    def encode(prompts: list[str]) -> dict[str, np.ndarray]:
        embeds, pooled = text.encode(prompts, seed=int(c.text_seed), language=lang)
        return {"prompt_embeds": embeds, "pooled": pooled}

    ev = evaluate.eval_set(16, vae.LATENT_SHAPE, seed=int(config.eval.seed), tasks=c.tasks)
    return World(
        model_path=os.path.abspath(teacher_dir(config, workdir)),
        transformer_folder=teacher_dir(config, workdir),
        prompts=[data.all_prompts()[i] for i in pool.prompt_ids],
        encode=encode,
        decode=lambda z: vae.decode(autoencoder, z),
        latent_shape=vae.LATENT_SHAPE,
        x0=lambda idx: latents[idx],
        eval_prompts=ev.prompts,
        score=lambda images: {"accuracy": evaluate.score(images, ev.prompt_ids)["accuracy"]},
        finish=report,
        fingerprint=f"digits_compose-text{c.text_seed}-pool{c.pool_seed}-{c.pool_size}-{c.tasks or 'all'}"
        + (f"-captions{float(c.caption_noise):g}" if c.caption_noise else ""),
        config_section="compose",
        config_folders=("compose.vae_dir", "compose.teacher_dir"),
        components={"vae": folder_fingerprint(vae_dir(config, workdir))},
    )


def _save(path: str, images: np.ndarray, prompt_ids: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, images=np.clip(images, 0.0, 1.0).astype(np.float32), prompt_ids=prompt_ids)


def eval_prompts_of(config: ml_collections.ConfigDict) -> list[str]:
    """The report's evaluation prompts, in sample order."""
    return evaluate.eval_set(int(config.compose.eval_samples), vae.LATENT_SHAPE, tasks=config.compose.tasks).prompts


def evaluate_models(
    config: ml_collections.ConfigDict, workdir: str, student: nnx.Module | None, *, rows: dict | None = None
) -> dict:
    """Sample (through the VAE) and score the teacher rows, and the student when given, on the fixed eval set.

    `rows`: name -> (steps, schedule, guidance) of the teacher, default `TEACHER_ROWS` (teacher_28_diffusers,
    the reference of `mse_to_reference`, must come first). Teacher samples are cached in the teacher folder.
    """
    c = config.compose
    ev = evaluate.eval_set(int(c.eval_samples), vae.LATENT_SHAPE, tasks=c.tasks)
    cond = text.encode_with_uncond(ev.prompts, seed=int(c.text_seed), language=language())
    folder = teacher_dir(config, workdir)
    base, autoencoder = load_transformer(folder), load_vae(vae_dir(config, workdir))
    shift, w = float(config.distill.shift), float(c.teacher_guidance)
    spec = {
        name: (base, steps, schedule, w if cfg else 0.0)
        for name, (steps, schedule, cfg) in (rows or TEACHER_ROWS).items()
    }
    if student is not None:
        k = int(config.distill.num_segments)
        spec[f"student_{k}"] = (student, k, config.distill.schedule, 0.0)
    images, metrics = {}, {}
    for name, (model, steps, schedule, guidance) in spec.items():
        cache = None
        if model is base:
            cache = os.path.join(folder, "samples", f"{name}_w{guidance:g}_shift{shift:g}_n{len(ev.prompts)}.npz")
        if cache and os.path.isfile(cache):
            with np.load(cache) as f:
                images[name] = f["images"]
        else:
            t = time.perf_counter()
            z = sample(model, cond, ev.noise, steps=steps, schedule=schedule, shift=shift, guidance=guidance, raw=True)
            images[name] = vae.decode(autoencoder, z)
            print(f"sampled {name} in {time.perf_counter() - t:.1f} s", flush=True)
            if cache:
                _save(cache, images[name], ev.prompt_ids)
        _save(os.path.join(workdir, "samples", f"{name}.npz"), images[name], ev.prompt_ids)
        save_grid(os.path.join(workdir, "samples", f"{name}.png"), images[name][:GRID], cols=8, scale=4)
        ref = None if name == "teacher_28_diffusers" else images["teacher_28_diffusers"]
        metrics[name] = {
            **evaluate.evaluate(images[name], ev.prompt_ids, ref, tasks=c.tasks),
            "nfe": steps * (2 if guidance > 1 else 1),
            "steps": steps,
            "schedule": schedule,
            "guidance": guidance,
        }
    return metrics


TEACHER_ROWS = {  # name -> (steps, schedule, CFG)
    "teacher_28_diffusers": (28, "diffusers", True),
    "teacher_4_diffusers": (4, "diffusers", True),
    "teacher_4_rectified": (4, "rectified", True),
    "teacher_4_rectified_nocfg": (4, "rectified", False),  # the student's budget: 4 NFE
}


def metrics_table(metrics: dict) -> str:
    from flowsteer_jax.evaluate import markdown_table

    return markdown_table(report_rows(metrics), COLUMNS)


def report_header(config: ml_collections.ConfigDict, clf: dict[str, float]) -> str:
    """The report's first lines; `clf`: `evaluate.classifier_accuracy()` (computed once by the caller)."""
    return (
        "# FlowSteer in the compositional digits world\n\n"
        f"Evaluation: {config.compose.eval_samples} fixed prompts and noises "
        f"({len(data.task_ids(config.compose.tasks))} GenEval-like tasks, equally often); "
        "prompt accuracy = everything the prompt asks right (cell classifier trained on the training split; on "
        f"held-out real cells {clf['cell']:.3f}, whole real scenes {clf['scene']:.3f}); FD against held-out real "
        "scenes."
    )


def evaluate_run(workdir: str, config: ml_collections.ConfigDict) -> tuple[list[dict], str]:
    """`python -m flowsteer_jax.evaluate --digits=WORKDIR`: the teacher rows and the run's latest student, scored
    as the trainer's report does; (rows for `flowsteer_jax.evaluate`, the report's header)."""
    from conversion.errors import InputError
    from flowsteer_jax.digits.world import load_student

    if not vae.is_complete(vae_dir(config, workdir)):
        raise InputError(f"{vae_dir(config, workdir)}: no complete VAE (train the run first)")
    metrics = evaluate_models(config, workdir, load_student(teacher_dir(config, workdir), workdir))
    return report_rows(metrics), report_header(config, evaluate.classifier_accuracy())


def report(config: ml_collections.ConfigDict, workdir: str, student: nnx.Module, stats: dict) -> dict:
    """Evaluate, then write `metrics.json` and `report.md` (called by the trainer at the end of the run)."""
    t = time.perf_counter()
    metrics = evaluate_models(config, workdir, student)
    tmeta = teacher.teacher_meta(teacher_dir(config, workdir))
    vmeta = vae.vae_meta(vae_dir(config, workdir))
    clf = evaluate.classifier_accuracy()
    out = {"rows": metrics, "training": stats, "teacher": tmeta, "vae": vmeta, "classifier_held_out": clf}
    out["evaluation_seconds"] = time.perf_counter() - t
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(out, f, indent=2)
    d = config.distill
    lines = [
        report_header(config, clf),
        "",
        metrics_table(metrics),
        "",
        f"Distillation: {stats.get('steps')} steps of batch {config.train.batch_size}, {d.num_segments} segments "
        f"({d.schedule} schedule, shift {d.shift}), start points {d.start_points}, teacher CFG "
        f"U[{d.cfg_min}, {d.cfg_max}]; {stats.get('seconds', 0):.0f} s ({stats.get('windows_per_s', 0):.1f} "
        "trained windows/s).",
        f"Teacher: {tmeta.get('steps', '?')} steps of batch {tmeta.get('batch_size', '?')}, "
        f"{tmeta.get('train_seconds', 0):.0f} s; VAE: {vmeta.get('steps')} steps, "
        f"{vmeta.get('train_seconds', 0):.0f} s, reconstruction MSE {vmeta.get('final_mse', 0):.4f}.",
    ]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out
