"""The paper's ablations in a toy world (digits, or the compositional digits world): Tables 1 (interpolated vs
on-trajectory starts), 2 (schedules), 5 (components), 4 (discriminator) and 1- and 2-step students, over seeds.

    python -m flowsteer_jax.digits.ablate --workdir=runs/ablate [--config=configs/digits_compose.py] \
        [--tables=1,2,5,4,k] [--seeds=3] [--steps=N] [--rows=NAME,...] [--set KEY=VALUE ...]

The world is the config's (`world = "digits"` or `"digits_compose"`); its models (teacher, and VAE) are shared
by every run (`WORKDIR/teacher`, `WORKDIR/vae`, trained if absent). Default tables: 1, 2, 5.

Table 5, cumulative rows, each a full distillation with `seed = k` for k < seeds, scored on the world's fixed
evaluation set:

- PeRFlow: interpolated start points from real pairs, diffusers schedule, no discriminator;
- +OTA: start points from the teacher's trajectory;
- +adversarial: hinge discriminator, `L_adv` (no feature matching);
- +rectified schedule: the rectified window grid (the student's inference grid too);
- full: + feature matching (`L_FM`), i.e. the config as it is. The paper does not say what separates its
  "+Scheduler" and "Ours (Full)" rows; feature matching is the one remaining part of the method.

Table 4 (`--tables=4`): the full method with one change each: the discriminator's depth (1 or all 4 teacher
blocks instead of 2), heads on every block, a frozen or LoRA trunk, the non-saturating or least-squares loss.
`--tables=k`: the full method with K = 1 and 2 windows (1- and 2-step students). A value within noise of the row
it is compared with (the row above in Table 5, the full method elsewhere) is marked ≈.

Teacher-only tables, over the same seeds (evaluation noise `EVAL_SEED + k`), CFG at the world's teacher guidance:
Table 2 samples N = 1, 2, 4, 8, 28 steps with both schedules (≈: rectified within noise of diffusers at that N).
Table 1 takes the teacher's 28-step grid through the student's window boundaries (`distill.ota.teacher_grid`)
and, at each window start t < 1, resumes the teacher from the interpolated point `(1 - t) x0 + t eps` (x0: a
real training-split image for the prompt, the point PeRFlow trains from) instead of its own state there; the
"own trajectory" row is the uninterrupted solve from the same noise eps (the same at every t), which is also
the reference of the interpolated rows' MSE (≈: within noise of it).

Results: `WORKDIR/ablation.md`, `ablation.json` (accumulated over invocations with the same settings, so
`--tables=k` after the default tables adds its rows and reuses the finished runs of the full method), and samples
`WORKDIR/samples/<row>_seed<k>.npz`. The OTA cost column is trained windows per second of each row.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
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
SCHEDULES = ("diffusers", "rectified")
TABLE1_STEPS = 28
TABLES = ("1", "2", "5", "4", "k")
METRICS = (  # (key, header, decimals): the columns a world's results have
    ("accuracy", "prompt accuracy ↑", 3),
    ("identity", "digits ↑", 3),
    ("count", "count ↑", 3),
    ("position", "position ↑", 3),
    ("attribute", "colour ↑", 3),
    ("fd", "FD ↓", 2),
    ("mse_to_reference", "MSE to reference ↓", 4),
)


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


def world_module(config):
    """The toy world's module (`share_models`, `lab`), by `config.world`."""
    import importlib

    from flowsteer_jax.digits.world import TOY_WORLDS
    from flowsteer_jax.worlds import WORLDS

    name = str(config.get("world"))
    if name not in TOY_WORLDS:
        raise InputError(f"world={name!r}: the ablation runs in a toy world, one of {TOY_WORLDS}")
    return importlib.import_module(WORLDS[name])


def _finished(run_dir: str, steps: int) -> dict | None:
    """A run's `metrics.json` (its report) if it has trained all `steps`, else None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        m = json.load(f)
    return m if m.get("training", {}).get("steps") == steps else None


def train_rows(base_config, workdir: str, seeds: int, steps: int | None, rows: list[str]) -> dict:
    """Each row of `rows` distilled `seeds` times from the shared models; the students' metrics per row."""
    from flowsteer_jax.train import train

    world = world_module(base_config)
    results = {}
    for _table, name, _label, overrides in ROWS:
        if name not in rows:
            continue
        for k in range(seeds):
            config = base_config.copy_and_resolve_references()
            for key, value in overrides.items():
                _set(config, key, value)
            config.seed = k
            world.share_models(config, workdir)
            config.eval.every_steps = 0
            config.checkpoint.every_steps = 0
            if steps:
                config.train.num_steps = steps
            run_dir = os.path.join(workdir, "ablation", f"{name}_seed{k}")
            m = _finished(run_dir, int(config.train.num_steps))
            if m is None:  # else reused as it is: a run of the same row and settings (see `_main`)
                train(config, run_dir)
                m = _finished(run_dir, int(config.train.num_steps))
            student = f"student_{config.distill.num_segments}"
            shutil.copyfile(
                os.path.join(run_dir, "samples", f"{student}.npz"),
                os.path.join(workdir, "samples", f"{name}_seed{k}.npz"),
            )
            results.setdefault(name, []).append(
                {**m["rows"][student], "windows_per_s": m["training"]["windows_per_s"], "step": m["training"]["steps"]}
            )
    return results


def teacher_tables(base_config, workdir: str, seeds: int, tables: set[str]) -> tuple[dict, dict]:
    """(Table 1, Table 2): row name -> one metrics dict per seed."""
    from flowsteer_jax.digits.evaluate import sample
    from flowsteer_jax.distill.ota import teacher_grid
    from flowsteer_jax.flow.schedules import sigmas

    world = world_module(base_config)
    d = base_config.distill
    shift = float(d.shift)
    t1: dict = {}
    t2: dict = {}
    for k in range(seeds):
        lab = world.lab(base_config, workdir, k)

        def run(name, noise, grid, ref, lab=lab, k=k):
            z = sample(lab.model, lab.cond, noise, sigmas=grid, guidance=lab.guidance, raw=True)
            images = lab.decode(z)
            lab.save(os.path.join(workdir, "samples", f"{name}_seed{k}.npz"), images)
            return images, lab.score(images, ref)

        if "2" in tables:
            ref, m = run("teacher_28_diffusers", lab.noise, sigmas(28, "diffusers", shift), None)
            t2.setdefault("teacher_28_diffusers", []).append(m)
            for schedule in SCHEDULES:
                for n in TEACHER_STEPS:
                    if (n, schedule) != (28, "diffusers"):
                        name = f"teacher_{n}_{schedule}"
                        t2.setdefault(name, []).append(run(name, lab.noise, sigmas(n, schedule, shift), ref)[1])
        if "1" in tables:
            grid, index = teacher_grid(int(d.num_segments), TABLE1_STEPS, d.schedule, shift)
            own, m = run("table1_trajectory", lab.noise, grid, None)
            t1.setdefault("trajectory", []).append(m)
            for i in index[1:-1]:
                t = float(grid[i])
                start = (1 - t) * lab.x0 + t * lab.noise
                name = f"interpolated_{t:.3f}"
                t1.setdefault(name, []).append(run(f"table1_{name}", start, grid[i:], own)[1])
    return t1, t2


def _noise_mark(a: list[float], b: list[float]) -> str:
    """ " ≈" when two rows' means differ by less than their noise (the root sum of their std's), else ""."""
    if len(a) < 2 or len(b) < 2:
        return ""
    return " ≈" if abs(np.mean(a) - np.mean(b)) < np.hypot(np.std(a), np.std(b)) else ""


def _columns(*results: dict) -> list[tuple[str, str, int]]:
    """The metric columns any row of `results` has a finite value for."""
    have = {
        key
        for r in results
        for runs in r.values()
        for x in runs
        for key, v in x.items()
        if isinstance(v, int | float) and np.isfinite(v)
    }
    return [c for c in METRICS if c[0] in have]


def _cells(runs: list[dict], against: list[dict] | None, columns) -> list[str]:
    cells = []
    for key, _header, digits in columns:
        values = [x[key] for x in runs if x.get(key) is not None]
        if not values:
            cells.append("—")
            continue
        other = [x[key] for x in against or () if x.get(key) is not None]
        cells.append(_mean_std(values, digits) + _noise_mark(values, other))
    return cells


def markdown(trained: dict, t1: dict, t2: dict, seeds: int, machine: str, world: str, steps: int = 28) -> str:
    lines = [f"# Ablation in the {world} world ({seeds} seeds, mean ± std; {machine})", ""]
    columns = _columns(trained, t1, t2)
    header = " | ".join(h for _, h, _ in columns)
    rule = "---:|" * len(columns)
    if t1:
        lines += [
            f"## Table 1: the teacher ({steps}-step grid, CFG) resumed at a window start t from an interpolated point",
            "",
            f"| start | {header} |",
            f"|---|{rule}",
            "| own trajectory (every t) | " + " | ".join(_cells(t1["trajectory"], None, columns)) + " |",
        ]
        for name, runs in t1.items():
            if name != "trajectory":
                cells = _cells(runs, t1["trajectory"], columns)
                lines.append(f"| interpolated at t = {name.split('_')[1]} | " + " | ".join(cells) + " |")
        lines += ["", "≈: within noise (|mean difference| < root sum of the std's) of the own-trajectory row.", ""]
    if t2:
        lines += [
            "## Table 2: the teacher with the diffusers vs the rectified schedule (CFG)",
            "",
            f"| N | schedule | {header} |",
            f"|---:|---|{rule}",
        ]
        for n in TEACHER_STEPS:
            for schedule in SCHEDULES:
                against = t2[f"teacher_{n}_diffusers"] if schedule == "rectified" else None
                cells = _cells(t2[f"teacher_{n}_{schedule}"], against, columns)
                lines.append(f"| {n} | {schedule} | " + " | ".join(cells) + " |")
        lines += ["", "≈: rectified within noise of diffusers at the same N.", ""]
    for table, title in TABLE_TITLES.items():
        rows = [(name, label) for t, name, label, _ in ROWS if t == table and name in trained]
        if not rows:
            continue
        lines += [f"## {title}", "", f"| row | {header} | trained windows/s |", f"|---|{rule}---:|"]
        previous = None
        for name, label in rows:
            # ≈: within noise of the row before (Table 5, cumulative) or of the full method (the others)
            against = previous if table == "5" else ("full" if name != "full" else None)
            cells = _cells(trained[name], trained.get(against), columns)
            rate = np.mean([x["windows_per_s"] for x in trained[name]])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {rate:.1f} |")
            previous = name
        lines += ["", "≈: within noise (|mean difference| < root sum of the std's) of " + (
            "the row above." if table == "5" else "the full method's row (Table 5)."
        ), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "run folder (teacher/, samples/, ablation.md)", flag_values=fv, required=True)
    flags.DEFINE_string(
        "config", os.path.join("configs", "digits.py"), "the config (world digits or digits_compose)", flag_values=fv
    )
    flags.DEFINE_integer("seeds", 3, "seeds per row", flag_values=fv)
    flags.DEFINE_integer("steps", 0, "distillation steps per run (default: the config's)", flag_values=fv)
    flags.DEFINE_string("tables", "1,2,5", "which tables: any of 1, 2, 5, 4, k (comma-separated)", flag_values=fv)
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
    world_module(config)  # a toy world, before anything trains
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if tables - set(TABLES):
        raise InputError(f"--tables: unknown {sorted(tables - set(TABLES))}; choose from {', '.join(TABLES)}")
    names = [r[1] for r in ROWS]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or [r[1] for r in ROWS if r[0] in tables]
    unknown = sorted(set(rows) - set(names))
    if unknown:
        raise InputError(f"--rows: unknown {unknown}; choose from {names}")
    if any(r[0] in ("4", "k") for r in ROWS if r[1] in rows) and "full" not in rows:
        rows.append("full")  # Table 4 and the K rows are read against the full method
    os.makedirs(os.path.join(args.workdir, "samples"), exist_ok=True)
    # Results accumulate over invocations with the same settings (e.g. --tables=k after the default tables, reusing
    # the full method's finished runs); other settings start afresh.
    settings = {"config": os.path.abspath(args.config), "set": list(args.set), "steps": args.steps, "seeds": args.seeds}
    path = os.path.join(args.workdir, "ablation.json")
    before: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before.get("settings") != settings:
            logging.getLogger("flowsteer_jax").warning(
                "%s holds results of other settings (%s); starting afresh", path, before.get("settings")
            )
            before = {}
    t0 = time.perf_counter()
    t1, t2 = teacher_tables(config, args.workdir, args.seeds, tables)
    t_teacher = time.perf_counter() - t0
    trained = train_rows(config, args.workdir, args.seeds, args.steps or None, rows)
    trained = {**before.get("rows", {}), **trained}
    t1, t2 = t1 or before.get("table1", {}), t2 or before.get("table2", {})
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    md = markdown(trained, t1, t2, args.seeds, machine, str(config.world), TABLE1_STEPS)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(md)
    run = {"tables": sorted(tables), "rows": rows, "teacher_seconds": t_teacher, "seconds": time.perf_counter() - t0}
    out = {
        "settings": settings,
        "rows": trained,
        "table1": t1,
        "table2": t2,
        "invocations": [*before.get("invocations", []), run],
        "machine": machine,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
