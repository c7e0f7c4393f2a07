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
`--tables=k`: the full method with K = 1 and 2 windows (1- and 2-step students). `--tables=m`: the mechanism rows
(interpolated starts + adversarial, D on the student's rollout, the velocity loss's window weighting). A value whose
difference from the row it is compared with (the row above in Table 5, the full method elsewhere) is not resolved
(Welch's p >= 0.05 over seeds) is marked ≈; every such test, with the paired-by-seed p, is listed under the tables.
Rows are mean ± the sample std (ddof = 1).

Teacher-only tables, over the same seeds (evaluation noise `EVAL_SEED + k`), CFG at the world's teacher guidance:
Table 2 samples N = 1, 2, 4, 8, 28 steps with both schedules (≈: rectified within noise of diffusers at that N).
Table 1 takes the teacher's 28-step grid through the student's window boundaries (`distill.ota.teacher_grid`)
and, at each window start t < 1, resumes the teacher from the interpolated point `(1 - t) x0 + t eps` (x0: a
real training-split image for the prompt, the point PeRFlow trains from) instead of its own state there; the
"own trajectory" row is the uninterrupted solve from the same noise eps (the same at every t), which is also
the reference of the interpolated rows' MSE (≈: within noise of it).

A world with `compose.gate` (`configs/digits_compose_noisy.py`) runs Tables 1 and 2 first and trains no row unless
the teacher-only gate passes (`gate`, docs/design.md "Worlds"); Table 1 then also has the own-sample controls and
per-image paired statistics.

Results: `WORKDIR/ablation.md`, `<config>_ablation.json` (`{row: {metric: [per seed]}}`, the paper's Table 5 row
names), `ablation.json` (accumulated over invocations with the same settings, so
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
    ("m", "interp_adv", "interpolated starts + adversarial", {"distill.start_points": "interpolate"}),
    ("m", "rollout", "D judges the student's rollout", {"adv.student_states": "rollout"}),
    ("m", "weight_length", "velocity loss weighted by window length", {"loss.window_weighting": "length"}),
    ("m", "weight_uniform", "velocity loss weighted uniformly", {"loss.window_weighting": "uniform"}),
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
    "m": "The mechanism: each row changes one thing of the full method",
    "k": "Beyond the paper: 1- and 2-step students (full method)",
}
# The names of the Table 5 rows in `<world>_ablation.json` (the paper's; other rows keep their names).
JSON_NAMES = {
    "perflow": "PeRFlow",
    "ota": "+OTA",
    "adversarial": "+adversarial",
    "rectified": "+rectified",
    "full": "full",
}
ALPHA = 0.05  # ≈ marks a difference with Welch's p >= ALPHA: not resolved
TEACHER_STEPS = (1, 2, 4, 8, 28)
SCHEDULES = ("diffusers", "rectified")
TABLE1_STEPS = 28
TABLES = ("1", "2", "5", "4", "m", "k")
TABLE1_STARTS = (  # Table 1's start points at t: (row prefix, label); x0 from the data or the teacher's samples
    ("interpolated", "interpolated"),  # x0: PeRFlow's (the world's training data for the prompt)
    ("coupled", "control: own sample, same eps"),  # x0: the teacher's own output from this eps
    ("uncoupled", "control: own sample, other eps"),  # x0: the teacher's own output for the prompt from other noise
)
JSON_METRICS = {"mse_to_reference": "mse_teacher"}  # metric names in `<world>_ablation.json`
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
    """Mean ± the sample standard deviation (ddof = 1; 0 for one value)."""
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def welch_p(a: list[float], b: list[float]) -> float:
    """Welch's two-sided t-test p-value of two rows' per-seed values (NaN with fewer than 2 each or no spread)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_p(a: list[float], b: list[float]) -> float:
    """Paired two-sided t-test p-value of rows whose k-th values share seed k (the distillation seed; every row is
    scored on the same evaluation prompts and noises). NaN with fewer than 2 pairs or no spread."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2 or np.ptp(d) == 0:
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


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


def train_rows(base_config, workdir: str, seeds: int, steps: int | None, rows: list[str]) -> tuple[dict, dict]:
    """Each row of `rows` distilled `seeds` times from the shared models: (the students' metrics per row, the
    teacher rows of the runs' reports, `REFERENCE_LABELS`: the same for every run)."""
    from flowsteer_jax.train import train

    world = world_module(base_config)
    results, references = {}, {}
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
            references.update({r: m["rows"][r] for r in REFERENCE_LABELS if r in m["rows"]})
    return results, references


def _paired(correct: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-image paired statistics of two rows sampled from the same prompts and noises: the mean and sample
    variance of `reference - correct` (1 = the reference right and this row wrong), and their count."""
    d = reference.astype(np.float64) - correct.astype(np.float64)
    return {"paired_n": float(d.size), "paired_mean": float(d.mean()), "paired_var": float(d.var(ddof=1))}


def pooled_paired(runs: list[dict]) -> tuple[float, float]:
    """(mean, standard error) of the per-image paired differences of `_paired`, pooled over seeds."""
    n = np.array([r["paired_n"] for r in runs])
    m = np.array([r["paired_mean"] for r in runs])
    v = np.array([r["paired_var"] for r in runs])
    total = n.sum()
    mean = float((n * m).sum() / total)
    var = ((n - 1) * v).sum() + (n * np.square(m - mean)).sum()
    return mean, float(np.sqrt(var / (total - 1) / total))


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

        def run(name, noise, grid, ref, against=None, guidance=None, lab=lab, k=k):
            """(latents, images, metrics) of the teacher from `noise` along `grid`; `against`: the correctness
            of the row this one is paired with."""
            w = lab.guidance if guidance is None else guidance
            z = sample(lab.model, lab.cond, noise, sigmas=grid, guidance=w, raw=True)
            images = lab.decode(z)
            lab.save(os.path.join(workdir, "samples", f"{name}_seed{k}.npz"), images)
            m = lab.score(images, ref)
            if lab.correct is not None:
                correct = lab.correct(images)
                m["_correct"] = correct
                if against is not None:
                    m.update(_paired(correct, against))
            return z, images, m

        def keep(table, name, m):
            table.setdefault(name, []).append({key: v for key, v in m.items() if not key.startswith("_")})

        if "2" in tables:
            _, ref, m28 = run("teacher_28_diffusers", lab.noise, sigmas(28, "diffusers", shift), None)
            keep(t2, "teacher_28_diffusers", m28)
            for schedule in SCHEDULES:
                for n in TEACHER_STEPS:
                    if (n, schedule) != (28, "diffusers"):
                        name = f"teacher_{n}_{schedule}"
                        keep(t2, name, run(name, lab.noise, sigmas(n, schedule, shift), ref, m28.get("_correct"))[2])
            # What CFG adds at the reference's 28 steps (the gate's "CFG matters")
            m = run("teacher_28_diffusers_nocfg", lab.noise, sigmas(28, "diffusers", shift), ref, None, 0.0)[2]
            keep(t2, "teacher_28_diffusers_nocfg", m)
        if "1" in tables:
            grid, index = teacher_grid(int(d.num_segments), TABLE1_STEPS, d.schedule, shift)
            own_z, own, m = run("table1_trajectory", lab.noise, grid, None)
            keep(t1, "trajectory", m)
            # The uncoupled control's x0: the teacher's own samples of the same prompts from other noise
            other = np.random.default_rng([k, 3]).standard_normal(lab.noise.shape).astype(np.float32)
            other_z = run("table1_other_noise", other, grid, None)[0]
            x0s = {"interpolated": lab.x0, "coupled": own_z, "uncoupled": other_z}
            for i in index[1:-1]:
                t = float(grid[i])
                for kind, _label in TABLE1_STARTS:
                    start = (1 - t) * np.asarray(x0s[kind]) + t * lab.noise
                    name = f"{kind}_{t:.3f}"
                    keep(t1, name, run(f"table1_{name}", start, grid[i:], own, m.get("_correct"))[2])
    return t1, t2


GATE = (  # the teacher-only gate of a world built to show the mechanism (`compose.gate`); thresholds in points
    "Table 1: resumed from interpolated points, the teacher scores >= 3 paired SE lower than on its own trajectory"
    " (t = 0.75 and 0.5)",
    "Table 1: the coupled own-sample control stays within 2 paired SE of the own trajectory (t = 0.75 and 0.5)",
    "the best 4-step CFG teacher is >= 5 points below the 28-step one",
    "CFG adds >= 15 points at 28 steps",
)


def gate(t1: dict, t2: dict) -> list[tuple[str, bool, str]]:
    """The gate's criteria (`GATE`) on the teacher tables: (criterion, passed, the measurement)."""

    def acc(name: str) -> float:
        return float(np.mean([x["accuracy"] for x in t2[name]]))

    out = []
    for kind, bound, criterion in (("interpolated", 3.0, GATE[0]), ("coupled", 2.0, GATE[1])):
        passed, said = True, []
        for t in ("0.750", "0.500"):
            runs = t1.get(f"{kind}_{t}")
            if not runs or "paired_n" not in runs[0]:
                passed, said = False, said + [f"t = {t}: not measured"]
                continue
            mean, se = pooled_paired(runs)
            z = mean / se if se > 0 else (0.0 if mean == 0 else np.inf * np.sign(mean))
            passed &= bool(z >= bound) if kind == "interpolated" else bool(abs(z) < bound)
            said.append(f"t = {t}: {100 * mean:+.1f} points ({z:+.1f} SE)")
        out.append((criterion, passed, "; ".join(said)))
    if t2:
        best4 = max(acc("teacher_4_diffusers"), acc("teacher_4_rectified"))
        gap = acc("teacher_28_diffusers") - best4
        out.append((GATE[2], gap >= 0.05, f"28 steps {acc('teacher_28_diffusers'):.3f}, best 4 steps {best4:.3f}"))
        cfg = acc("teacher_28_diffusers") - acc("teacher_28_diffusers_nocfg")
        out.append((GATE[3], cfg >= 0.15, f"with CFG {acc('teacher_28_diffusers'):.3f}, without "
                    f"{acc('teacher_28_diffusers_nocfg'):.3f}"))  # fmt: skip
    else:
        out += [(GATE[2], False, "Table 2 not run"), (GATE[3], False, "Table 2 not run")]
    return out


def _noise_mark(a: list[float], b: list[float]) -> str:
    """ " ≈" when a difference between two rows is not resolved (Welch's p >= ALPHA), else ""."""
    if len(a) < 2 or len(b) < 2:
        return ""
    p = welch_p(a, b)
    if np.isnan(p):  # no spread in either row: resolved unless the means agree
        return " ≈" if np.mean(a) == np.mean(b) else ""
    return " ≈" if p >= ALPHA else ""


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


def _comparisons(trained: dict, columns) -> list[str]:
    """The tests behind every ≈ of the trained tables: mean difference, Welch's p and the paired (same-seed) p."""
    lines = [
        "## Comparisons (trained rows; Welch's t-test over seeds, and paired by seed)",
        "",
        "| row | against | metric | difference | Welch p | paired p |",
        "|---|---|---|---:|---:|---:|",
    ]
    labels = {name: label for _, name, label, _ in ROWS}
    pairs = []
    for table in TABLE_TITLES:
        names = [name for t, name, _, _ in ROWS if t == table and name in trained]
        for i, name in enumerate(names):
            against = (names[i - 1] if i else None) if table == "5" else (None if name == "full" else "full")
            if against in trained:
                pairs.append((name, against))
    if "perflow" in trained and "full" in trained:
        pairs.append(("full", "perflow"))
    for name, against in pairs:
        for key, _header, digits in columns:
            a = [x[key] for x in trained[name] if x.get(key) is not None]
            b = [x[key] for x in trained[against] if x.get(key) is not None]
            if not a or not b:
                continue
            n = min(len(a), len(b))
            lines.append(
                f"| {labels[name]} | {labels[against]} | {key} | {np.mean(a) - np.mean(b):+.{digits}f} | "
                f"{welch_p(a, b):.3g} | {paired_p(a[:n], b[:n]):.3g} |"
            )
    return lines + ["", f"≈ in the tables: Welch's p >= {ALPHA} (not resolved).", ""]


def gap_closed(student: float, teacher_nocfg: float, target: float) -> float:
    """The fraction of the gap between the few-step teacher without CFG and the distillation target that the
    student closes."""
    gap = target - teacher_nocfg
    return (student - teacher_nocfg) / gap if gap else float("nan")


def markdown(
    trained: dict,
    t1: dict,
    t2: dict,
    seeds: int | str,
    machine: str,
    world: str,
    steps: int = 28,
    references: dict | None = None,
    gate_result: list | None = None,
) -> str:
    lines = [f"# Ablation in the {world} world ({seeds} seeds, mean ± sample std; {machine})", ""]
    columns = _columns(trained, t1, t2)
    header = " | ".join(h for _, h, _ in columns)
    rule = "---:|" * len(columns)
    if gate_result:
        ok = all(p for _, p, _ in gate_result)
        lines += [f"## The teacher-only gate: {'passed' if ok else 'FAILED'}", ""]
        lines += [f"- {'pass' if p else 'FAIL'}: {c}: {said}" for c, p, said in gate_result] + [""]
    if t1:
        lines += [
            f"## Table 1: the teacher ({steps}-step grid, CFG) resumed at a window start t from an interpolated point",
            "",
            f"| start | {header} | paired difference (SE) |",
            f"|---|{rule}---:|",
            "| own trajectory (every t) | " + " | ".join(_cells(t1["trajectory"], None, columns)) + " | |",
        ]
        labels = dict(TABLE1_STARTS)
        for name, runs in t1.items():
            kind, _, t = name.rpartition("_")
            if kind not in labels:
                continue
            cells = _cells(runs, t1["trajectory"], columns)
            paired = ""
            if "paired_n" in runs[0]:
                mean, se = pooled_paired(runs)
                paired = f"{-100 * mean:+.1f} points ({se * 100:.1f})"
            lines.append(f"| {labels[kind]}, t = {t} | " + " | ".join(cells) + f" | {paired} |")
        lines += [
            "",
            "≈: not resolved against the own-trajectory row (Welch over seeds). Paired difference: accuracy of the "
            "row minus the own trajectory's, per image (same prompts and noises), pooled over seeds, with its "
            "standard error.",
            "",
        ]
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
        if "teacher_28_diffusers_nocfg" in t2:
            cells = _cells(t2["teacher_28_diffusers_nocfg"], t2["teacher_28_diffusers"], columns)
            lines.append("| 28 | diffusers, no CFG | " + " | ".join(cells) + " |")
        lines += ["", "≈: rectified not resolved against diffusers at the same N.", ""]
    for table, title in TABLE_TITLES.items():
        rows = [(name, label) for t, name, label, _ in ROWS if t == table and name in trained]
        if not rows:
            continue
        lines += [f"## {title}", "", f"| row | {header} | trained windows/s |", f"|---|{rule}---:|"]
        previous = None
        for name, label in rows:
            # ≈: not resolved against the row before (Table 5, cumulative) or the full method (the others)
            against = previous if table == "5" else ("full" if name != "full" else None)
            cells = _cells(trained[name], trained.get(against), columns)
            rate = np.mean([x["windows_per_s"] for x in trained[name]])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {rate:.1f} |")
            previous = name
        for name in (references or {}) if table in ("5", "k") else ():
            cells = _cells([references[name]], None, columns)
            lines.append(f"| reference: {REFERENCE_LABELS.get(name, name)} | " + " | ".join(cells) + " | |")
        lines += ["", "≈: not resolved (Welch's p >= 0.05) against " + (
            "the row above." if table == "5" else "the full method's row (Table 5)."
        ), ""]  # fmt: skip
    if references and "full" in trained and {"teacher_4_rectified_nocfg", "teacher_28_diffusers"} <= set(references):
        full = [x["accuracy"] for x in trained["full"]]
        lo, hi = references["teacher_4_rectified_nocfg"]["accuracy"], references["teacher_28_diffusers"]["accuracy"]
        closed = [gap_closed(a, lo, hi) for a in full]
        lines += [
            f"The full method closes {_mean_std([100 * c for c in closed], 1)}% of the gap between the 4-step teacher "
            f"without CFG ({lo:.3f}) and the 28-step CFG teacher ({hi:.3f}).",
            "",
        ]
    if len(trained) > 1:
        lines += _comparisons(trained, columns)
    return "\n".join(lines) + "\n"


REFERENCE_LABELS = {
    "teacher_4_rectified_nocfg": "4-step teacher, no CFG (the student's NFE)",
    "teacher_28_diffusers": "28-step CFG teacher (the target)",
}


def ablation_json(trained: dict) -> dict:
    """`{row: {metric: [one value per seed]}}` of the trained rows (Table 5 rows by the paper's names)."""
    out = {}
    for name, runs in trained.items():
        keys = sorted({k for x in runs for k, v in x.items() if isinstance(v, int | float)})
        out[JSON_NAMES.get(name, name)] = {JSON_METRICS.get(k, k): [x.get(k) for x in runs] for k in keys}
    return out


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "run folder (teacher/, samples/, ablation.md)", flag_values=fv, required=True)
    flags.DEFINE_string(
        "config", os.path.join("configs", "digits.py"), "the config (world digits or digits_compose)", flag_values=fv
    )
    flags.DEFINE_integer("seeds", 3, "seeds per row", flag_values=fv)
    flags.DEFINE_integer(
        "teacher_seeds", 0, "evaluation seeds of the teacher-only Tables 1 and 2 (default: --seeds)", flag_values=fv
    )
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
    teacher_seeds = args.teacher_seeds or args.seeds
    settings = {"config": os.path.abspath(args.config), "set": list(args.set), "steps": args.steps, "seeds": args.seeds}
    if teacher_seeds != args.seeds:
        settings["teacher_seeds"] = teacher_seeds
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
    gated = bool(config.get("compose", {}).get("gate", False))
    if gated and rows:  # the gate needs both teacher tables before any student trains (accumulated ones count)
        tables |= {t for t, key in (("1", "table1"), ("2", "table2")) if not before.get(key)}
    t0 = time.perf_counter()
    t1, t2 = teacher_tables(config, args.workdir, teacher_seeds, tables)
    t_teacher = time.perf_counter() - t0
    t1, t2 = t1 or before.get("table1", {}), t2 or before.get("table2", {})
    gate_result = gate(t1, t2) if gated else None
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    name = os.path.splitext(os.path.basename(args.config))[0]
    trained, references = dict(before.get("rows", {})), dict(before.get("references", {}))

    def write(invocation: dict) -> str:
        seeds = args.seeds if teacher_seeds == args.seeds else f"{args.seeds} (Tables 1, 2: {teacher_seeds})"
        md = markdown(trained, t1, t2, seeds, machine, name, TABLE1_STEPS, references, gate_result)
        with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.workdir, f"{name}_ablation.json"), "w") as f:
            json.dump(ablation_json(trained), f, indent=2)
        out = {
            "settings": settings,
            "rows": trained,
            "references": references,
            "table1": t1,
            "table2": t2,
            "gate": gate_result,
            "invocations": [*before.get("invocations", []), invocation],
            "machine": machine,
        }
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        return md

    if gate_result and not all(p for _, p, _ in gate_result) and rows:
        write({"tables": sorted(tables), "rows": [], "teacher_seconds": t_teacher, "gate": "failed"})
        failed = "; ".join(f"{c}: {said}" for c, p, said in gate_result if not p)
        raise InputError(
            f"the teacher-only gate failed, so no student is trained ({failed}); see {args.workdir}/ablation.md"
        )
    new, refs = train_rows(config, args.workdir, args.seeds, args.steps or None, rows)
    trained.update(new)
    references.update(refs)
    run = {"tables": sorted(tables), "rows": rows, "teacher_seconds": t_teacher, "seconds": time.perf_counter() - t0}
    print(write(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
