"""The README's chip table: `chip_budget.py` over the shipped SD3 configs and chips, one subprocess per row.

    python benchmarks/chip_table.py [--rows=NAME,...] [--out=docs/chip_budget.jsonl]   # hours on 2 CPU cores
    python benchmarks/chip_table.py --render                                           # table from the JSONL

Rows marked `depths` are compiled at those (shallow) depths only, with the real model's ratio of discriminator
blocks to layers (1:2: 12 of 24, 19 of 38), and extrapolated linearly along that line to the real depth: per-device
memory and FLOPs are affine in (layers, blocks) at a fixed batch and mesh, so two points on the line fix it. The
TPU compiler needs minutes for a few layers of SD3 on this project's 2-core machine, hours for all 24; every other
row compiles the whole model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from flowsteer_jax import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEDIUM, LARGE = "configs/sd3_medium.py", "configs/sd3_5_large.py"
FSDP8 = ("--config.mesh.shape=(1,8,1)",)
# name: (config, chip, devices, parts, overrides, depths or None)
ROWS = {
    "medium-h100x1": (MEDIUM, "h100", 1, "train,student,teacher,vae", (), None),
    "medium-h100x8": (MEDIUM, "h100", 8, "train", (), None),
    "medium-h100x8-dp": (MEDIUM, "h100", 8, "train", ("--config.mesh.shape=(8,1,1)",), None),
    "medium-h200x1": (MEDIUM, "h200", 1, "train", (), None),
    "large-h100x8": (LARGE, "h100", 8, "train,student,teacher", (), None),
    "large-h200x8": (LARGE, "h200", 8, "train", (), None),
    "large-h200x1": (LARGE, "h200", 1, "train", ("--config.mesh.shape=(1,1,1)", "--config.train.batch_size=2"), None),
    # The extrapolation checked against the whole compiled model (medium-h100x1): same program, two depths.
    "medium-h100x1-extrapolated": (MEDIUM, "h100", 1, "train", (), (2, 4)),
    "medium-v5ex8": (MEDIUM, "v5e", 8, "train", FSDP8, None),
    "medium-v5px4": (MEDIUM, "v5p", 4, "train", ("--config.mesh.shape=(1,4,1)",), (2, 4)),
    "medium-v6ex8": (MEDIUM, "v6e", 8, "train", FSDP8, None),
}
REAL_DEPTH = {MEDIUM: (24, 12), LARGE: (38, 19)}  # (layers, discriminator blocks)


def run_row(name: str) -> dict:
    config, chip, devices, parts, overrides, depths = ROWS[name]
    results = []
    for depth in depths or (0,):
        cmd = [sys.executable, "-m", "benchmarks.chip_budget", f"--config={config}", f"--chip={chip}"]
        cmd += [f"--devices={devices}", f"--parts={parts}", *overrides]
        if depth:
            cmd += [f"--layers={depth}", f"--config.disc.num_blocks={depth // 2}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            return {"row": name, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1]}
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not depths:
        return {"row": name, **results[0]}
    return {"row": name, **extrapolate(results, REAL_DEPTH[config], depths)}


def extrapolate(results: list[dict], real: tuple[int, int], depths: tuple[int, int]) -> dict:
    """The line through the two compiled depths (blocks = layers / 2), evaluated at the real depth."""
    (a, b), (layers, disc) = depths, real
    lo, hi = results
    at_real = lambda x_lo, x_hi: x_lo + (x_hi - x_lo) * (layers - a) / (b - a)  # noqa: E731
    out = dict(hi)
    mem = {k: at_real(lo["train"]["memory"][k], hi["train"]["memory"][k]) for k in hi["train"]["memory"]}
    out["train"] = {**hi["train"], "memory": mem, "flops": at_real(lo["train"]["flops"], hi["train"]["flops"])}
    out["per_device_gib"] = mem["total_gib"]
    out["fits"] = mem["total_gib"] <= hi["chip_gib"]
    out["tflops_per_step"] = out["train"]["flops"] / 1e12
    out["step_s_lower_bound"] = at_real(lo["step_s_lower_bound"], hi["step_s_lower_bound"])
    out["layers"], out["disc_blocks"] = layers, disc
    out["extrapolated_from_depths"] = list(depths)
    out["compiled_gib"] = {str(d): r["per_device_gib"] for d, r in zip(depths, results, strict=True)}
    return out


def _gib(row: dict, part: str) -> str:
    return f"{row[part]['memory']['total_gib']:.1f}" if part in row else ""


def render(rows: list[dict]) -> str:
    lines = [
        "| config | chip x devices | mesh | batch | train GiB/device | fits | TFLOP/step | >= s/step | "
        "4-step image GiB | 28-step CFG image GiB | compile s |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | | | | error: {r['error'][:80]} | | | | | | |")
            continue
        mesh = "x".join(str(v) for v in r["mesh"].values())
        refused = r["train"].get("refused")  # the TPU compiler's CompileTimeHbmOom: temporaries alone
        note = f" (extrap. from {r['extrapolated_from_depths']} layers)" if "extrapolated_from_depths" in r else ""
        lines.append(
            f"| {r['preset']}{note} | {r['chip']} x{r['devices']} | {mesh} | {r['train']['global_batch']} | "
            f"{'> ' if refused else ''}{r['per_device_gib']:.1f} / {r['chip_gib']:.0f} | "
            f"{'yes' if r['fits'] else '**no**' + (' (compiler: out of HBM)' if refused else '')} | "
            f"{r['tflops_per_step']:.0f} | {r['step_s_lower_bound']:.1f} | {_gib(r, 'student_4step')} | "
            f"{_gib(r, 'teacher_28step_cfg')} | {r['train']['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("rows", ",".join(ROWS), f"rows to compile, of {list(ROWS)}", flag_values=fv)
    flags.DEFINE_string("out", os.path.join(ROOT, "docs", "chip_budget.jsonl"), "JSONL to append to", flag_values=fv)
    flags.DEFINE_bool("render", False, "only print the table of --out", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(define_flags, argv, prog="benchmarks.chip_table", doc=__doc__)
    if not args.render:
        for name in args.rows.split(","):
            row = run_row(name)
            with open(args.out, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(json.dumps(row, default=float)[:300], flush=True)
    with open(args.out) as f:
        rows = {r["row"]: r for r in map(json.loads, f)}  # the newest run of each row
    print(render(list(rows.values())))


if __name__ == "__main__":
    main()
