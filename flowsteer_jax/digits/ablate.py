"""The paper's ablations in the digits world: Table 5 (components) and Table 2 (schedules), over seeds.

    python -m flowsteer_jax.digits.ablate --workdir=runs/digits [--seeds=3] [--steps=N] [--config=configs/digits.py]

Table 5, cumulative rows, each a full distillation from the shared teacher (`WORKDIR/teacher`, pretrained if
absent) with `seed = k` for k < seeds, scored on the fixed evaluation set:

- PeRFlow: interpolated start points from real pairs, diffusers schedule, no discriminator;
- +OTA: start points from the teacher's trajectory;
- +adversarial: hinge discriminator, `L_adv` (no feature matching);
- +rectified schedule: the rectified window grid (the student's inference grid too);
- full: + feature matching (`L_FM`), i.e. `configs/digits.py` as it is. The paper does not say what separates
  its "+Scheduler" and "Ours (Full)" rows; feature matching is the one remaining part of the method.

Table 2: the teacher alone at N = 1, 2, 4, 8, 28 steps with both schedules (CFG at `digits.teacher_guidance`),
over the same seeds (evaluation noise `EVAL_SEED + k`). Results: `WORKDIR/ablation.md`, `ablation.json`, and
samples `WORKDIR/samples/<row>_seed<k>.npz`. The OTA cost column is trained windows per second of each row.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time

import numpy as np
from absl import flags

from conversion.errors import InputError
from flowsteer_jax import cli

PROG = "flowsteer_jax.digits.ablate"

ROWS = (
    (
        "perflow",
        "PeRFlow",
        {
            "distill.start_points": "interpolate",
            "distill.schedule": "diffusers",
            "loss.lambda_adv": 0.0,
            "loss.lambda_fm": 0.0,
        },
    ),
    (
        "ota",
        "+OTA",
        {"distill.start_points": "ota", "distill.schedule": "diffusers", "loss.lambda_adv": 0.0, "loss.lambda_fm": 0.0},
    ),
    (
        "adversarial",
        "+adversarial",
        {"distill.start_points": "ota", "distill.schedule": "diffusers", "loss.lambda_fm": 0.0},
    ),
    (
        "rectified",
        "+rectified schedule",
        {"distill.start_points": "ota", "distill.schedule": "rectified", "loss.lambda_fm": 0.0},
    ),
    ("full", "full (+feature matching)", {}),
)
TEACHER_STEPS = (1, 2, 4, 8, 28)


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:  # ConfigDicts accept new keys; a typo must not silently add one
        raise InputError(f"no config key {dotted!r}")
    node[leaf] = value


def _mean_std(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table5(base_config, workdir: str, seeds: int, steps: int | None, rows: list[str]) -> dict:
    from flowsteer_jax.digits import evaluate
    from flowsteer_jax.train import train

    results = {}
    ev = evaluate.eval_set(int(base_config.digits.eval_samples), seed=evaluate.EVAL_SEED)
    for name, _label, overrides in ROWS:
        if name not in rows:
            continue
        for k in range(seeds):
            config = base_config.copy_and_resolve_references()
            for key, value in overrides.items():
                _set(config, key, value)
            config.seed = k
            config.digits.teacher_dir = os.path.join(workdir, "teacher")
            config.eval.every_steps = 0
            config.checkpoint.every_steps = 0
            if steps:
                config.train.num_steps = steps
            run_dir = os.path.join(workdir, "ablation", f"{name}_seed{k}")
            out = train(config, run_dir)
            with open(os.path.join(run_dir, "metrics.json")) as f:
                m = json.load(f)
            student = m["rows"][f"student_{config.distill.num_segments}"]
            with np.load(os.path.join(run_dir, "samples", f"student_{config.distill.num_segments}.npz")) as f:
                images = f["images"]
            evaluate.save_samples(os.path.join(workdir, "samples", f"{name}_seed{k}.npz"), images, ev.digits)
            results.setdefault(name, []).append(
                {**student, "windows_per_s": m["training"]["windows_per_s"], "step": out["step"]}
            )
    return results


def table2(base_config, workdir: str, seeds: int) -> dict:
    from flowsteer_jax.digits import evaluate, text
    from flowsteer_jax.digits.world import ensure_teacher
    from flowsteer_jax.models.loading import load_transformer

    folder = ensure_teacher(base_config, workdir)
    model = load_transformer(folder)
    d = base_config.digits
    results: dict = {}
    for k in range(seeds):
        ev = evaluate.eval_set(int(d.eval_samples), seed=evaluate.EVAL_SEED + k)
        cond = text.encode_with_uncond(ev.prompts, seed=int(d.text_seed))
        ref = None
        for schedule in ("diffusers", "rectified"):
            for n in sorted(TEACHER_STEPS, reverse=True):
                images = evaluate.sample(
                    model,
                    cond,
                    ev.noise,
                    steps=n,
                    schedule=schedule,
                    shift=float(base_config.distill.shift),
                    guidance=float(d.teacher_guidance),
                )
                if ref is None:  # 28-step diffusers: the fidelity reference of this seed
                    ref = images
                name = f"teacher_{n}_{schedule}"
                evaluate.save_samples(os.path.join(workdir, "samples", f"{name}_seed{k}.npz"), images, ev.digits)
                results.setdefault(name, []).append(evaluate.evaluate(images, ev.digits, ref))
    return results


def markdown(t5: dict, t2: dict, seeds: int, machine: str) -> str:
    lines = [f"# Digits-world ablation ({seeds} seeds, mean ± std; {machine})", ""]
    if t5:
        lines += [
            "## Table 5: components (4-step student, no CFG)",
            "",
            "| row | prompt accuracy ↑ | FD ↓ | MSE to teacher-28 ↓ | trained windows/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, label, _ in ROWS:
            if name in t5:
                r = t5[name]
                lines.append(
                    f"| {label} | {_mean_std([x['accuracy'] for x in r])} | {_mean_std([x['fd'] for x in r], 2)} | "
                    f"{_mean_std([x['mse_to_reference'] for x in r], 4)} | "
                    f"{np.mean([x['windows_per_s'] for x in r]):.1f} |"
                )
        lines.append("")
    if t2:
        lines += [
            "## Table 2: teacher with the diffusers vs the rectified schedule (CFG)",
            "",
            "| N | schedule | prompt accuracy ↑ | FD ↓ | MSE to teacher-28 ↓ |",
            "|---:|---|---:|---:|---:|",
        ]
        for n in TEACHER_STEPS:
            for schedule in ("diffusers", "rectified"):
                r = t2[f"teacher_{n}_{schedule}"]
                lines.append(
                    f"| {n} | {schedule} | {_mean_std([x['accuracy'] for x in r])} | "
                    f"{_mean_std([x['fd'] for x in r], 2)} | "
                    f"{_mean_std([x.get('mse_to_reference', 0.0) for x in r], 4)} |"
                )
    return "\n".join(lines) + "\n"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "run folder (teacher/, samples/, ablation.md)", flag_values=fv, required=True)
    flags.DEFINE_string("config", os.path.join("configs", "digits.py"), "the digits config file", flag_values=fv)
    flags.DEFINE_integer("seeds", 3, "seeds per row", flag_values=fv)
    flags.DEFINE_integer("steps", 0, "distillation steps per run (default: the config's)", flag_values=fv)
    flags.DEFINE_string("tables", "2,5", "which tables: 2, 5 or 2,5", flag_values=fv)
    rows = ",".join(r[0] for r in ROWS)
    flags.DEFINE_string("rows", rows, "Table 5 rows to run (comma-separated)", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "config override KEY=VALUE, repeatable", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(define_flags, argv, prog=PROG, doc=__doc__)
    return cli.run(PROG, lambda: _main(args))


def _main(args) -> int:
    import importlib.util
    import logging
    import platform

    import jax

    from flowsteer_jax.distill.config import validate

    logging.getLogger("flowsteer_jax").setLevel(logging.INFO)
    if not os.path.isfile(args.config):
        raise InputError(f"--config={args.config}: no such config file")
    # One compilation per row: the seeds of a row share it through the persistent cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    spec = importlib.util.spec_from_file_location("ablation_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        try:
            _set(config, key, value)
        except (KeyError, AttributeError, TypeError, InputError) as e:
            raise InputError(f"--set {item}: {e}") from e
    validate(config)  # before any row trains
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - {r[0] for r in ROWS})
    if unknown:
        raise InputError(f"--rows: unknown {unknown}; choose from {[r[0] for r in ROWS]}")
    os.makedirs(os.path.join(args.workdir, "samples"), exist_ok=True)
    tables = {t.strip() for t in args.tables.split(",")}
    t0 = time.perf_counter()
    t2 = table2(config, args.workdir, args.seeds) if "2" in tables else {}
    t5 = table5(config, args.workdir, args.seeds, args.steps or None, rows) if "5" in tables else {}
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    md = markdown(t5, t2, args.seeds, machine)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump({"table5": t5, "table2": t2, "seconds": time.perf_counter() - t0, "machine": machine}, f, indent=2)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
