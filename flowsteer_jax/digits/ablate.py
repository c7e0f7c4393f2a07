"""The paper's ablations in the digits world: Tables 5 (components), 4 (discriminator), 2 (schedules) and 1- and
2-step students, over seeds.

    python -m flowsteer_jax.digits.ablate --workdir=runs/digits [--tables=2,5,4,k] [--seeds=3] [--steps=N] \
        [--rows=NAME,...] [--config=configs/digits.py]

Table 5, cumulative rows, each a full distillation from the shared teacher (`WORKDIR/teacher`, pretrained if
absent) with `seed = k` for k < seeds, scored on the fixed evaluation set:

- PeRFlow: interpolated start points from real pairs, diffusers schedule, no discriminator;
- +OTA: start points from the teacher's trajectory;
- +adversarial: hinge discriminator, `L_adv` (no feature matching);
- +rectified schedule: the rectified window grid (the student's inference grid too);
- full: + feature matching (`L_FM`), i.e. `configs/digits.py` as it is. The paper does not say what separates
  its "+Scheduler" and "Ours (Full)" rows; feature matching is the one remaining part of the method.

Table 4 (`--tables=4`): the full method with one change each: the discriminator's depth (1 or all 4 teacher
blocks instead of 2), heads on every block, a frozen or LoRA trunk, the non-saturating or least-squares loss.
`--tables=k`: the full method with K = 1 and 2 windows (1- and 2-step students). A value within noise of the row
it is compared with (the row above in Table 5, the full method elsewhere) is marked ≈.

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

# (table, name, label, config overrides). Table 5 rows are cumulative; Table 4 and the K rows each change one thing
# of the full method (`configs/digits.py`: a 2-block discriminator, half the teacher's 4, mlp head, hinge loss).
ROWS = (
    (
        "5",
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
        "5",
        "ota",
        "+OTA",
        {"distill.start_points": "ota", "distill.schedule": "diffusers", "loss.lambda_adv": 0.0, "loss.lambda_fm": 0.0},
    ),
    (
        "5",
        "adversarial",
        "+adversarial",
        {"distill.start_points": "ota", "distill.schedule": "diffusers", "loss.lambda_fm": 0.0},
    ),
    (
        "5",
        "rectified",
        "+rectified schedule",
        {"distill.start_points": "ota", "distill.schedule": "rectified", "loss.lambda_fm": 0.0},
    ),
    ("5", "full", "full (+feature matching)", {}),
    ("4", "disc_blocks1", "D trunk: 1 block", {"disc.num_blocks": 1}),
    ("4", "disc_blocks_all", "D trunk: all 4 blocks", {"disc.num_blocks": 4}),
    ("4", "disc_heads_every", "D heads on every block", {"disc.heads": "every"}),
    ("4", "disc_frozen", "D trunk frozen (heads train)", {"disc.trunk": "frozen"}),
    ("4", "disc_lora", "D trunk LoRA", {"disc.trunk": "lora"}),
    ("4", "gan_non_saturating", "non-saturating GAN loss", {"loss.gan": "non_saturating"}),
    ("4", "gan_least_squares", "least-squares GAN loss", {"loss.gan": "least_squares"}),
    ("k", "k1", "1-step student (K = 1)", {"distill.num_segments": 1}),
    ("k", "k2", "2-step student (K = 2)", {"distill.num_segments": 2}),
)
TABLE_TITLES = {
    "5": "Table 5: components (4-step student, no CFG)",
    "4": "Table 4: the discriminator (each row changes one thing of the full method)",
    "k": "Beyond the paper: 1- and 2-step students (full method)",
}
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


def train_rows(base_config, workdir: str, seeds: int, steps: int | None, rows: list[str]) -> dict:
    """Each row of `rows` distilled `seeds` times from the shared teacher; the students' metrics per row."""
    from flowsteer_jax.digits import evaluate
    from flowsteer_jax.train import train

    results = {}
    ev = evaluate.eval_set(int(base_config.digits.eval_samples), seed=evaluate.EVAL_SEED)
    for _table, name, _label, overrides in ROWS:
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


def _noise_mark(a: list[float], b: list[float]) -> str:
    """ " ≈" when two rows' means differ by less than their noise (the root sum of their std's), else ""."""
    if len(a) < 2 or len(b) < 2:
        return ""
    return " ≈" if abs(np.mean(a) - np.mean(b)) < np.hypot(np.std(a), np.std(b)) else ""


def markdown(trained: dict, t2: dict, seeds: int, machine: str) -> str:
    lines = [f"# Digits-world ablation ({seeds} seeds, mean ± std; {machine})", ""]
    metrics = (("accuracy", 3), ("fd", 2), ("mse_to_reference", 4))
    for table, title in TABLE_TITLES.items():
        rows = [(name, label) for t, name, label, _ in ROWS if t == table and name in trained]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| row | prompt accuracy ↑ | FD ↓ | MSE to teacher-28 ↓ | trained windows/s |",
            "|---|---:|---:|---:|---:|",
        ]
        previous = None
        for name, label in rows:
            # ≈: within noise of the row before (Table 5, cumulative) or of the full method (the others)
            against = previous if table == "5" else ("full" if name != "full" else None)
            cells = []
            for key, digits in metrics:
                values = [x[key] for x in trained[name]]
                mark = _noise_mark(values, [x[key] for x in trained[against]]) if against in trained else ""
                cells.append(_mean_std(values, digits) + mark)
            rate = np.mean([x["windows_per_s"] for x in trained[name]])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {rate:.1f} |")
            previous = name
        lines += ["", "≈: within noise (|mean difference| < root sum of the std's) of " + (
            "the row above." if table == "5" else "the full method's row (Table 5)."
        ), ""]  # fmt: skip
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
    flags.DEFINE_string("tables", "2,5", "which tables: any of 2, 5, 4, k (comma-separated)", flag_values=fv)
    flags.DEFINE_string(
        "rows", "", "only these trained rows (comma-separated names; default: every row of --tables)", flag_values=fv
    )
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
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if tables - {"2", *TABLE_TITLES}:
        raise InputError(f"--tables: unknown {sorted(tables - {'2', *TABLE_TITLES})}; choose from 2, 5, 4, k")
    names = [r[1] for r in ROWS]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or [r[1] for r in ROWS if r[0] in tables]
    unknown = sorted(set(rows) - set(names))
    if unknown:
        raise InputError(f"--rows: unknown {unknown}; choose from {names}")
    if any(r[0] in ("4", "k") for r in ROWS if r[1] in rows) and "full" not in rows:
        rows.append("full")  # Table 4 and the K rows are read against the full method
    os.makedirs(os.path.join(args.workdir, "samples"), exist_ok=True)
    t0 = time.perf_counter()
    t2 = table2(config, args.workdir, args.seeds) if "2" in tables else {}
    trained = train_rows(config, args.workdir, args.seeds, args.steps or None, rows)
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    md = markdown(trained, t2, args.seeds, machine)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(md)
    out = {"rows": trained, "table2": t2, "seconds": time.perf_counter() - t0, "machine": machine}
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
