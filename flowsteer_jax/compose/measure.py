"""Does the compositional world show the paper's regime? The teacher's rows over teacher seeds.

    python -m flowsteer_jax.compose.measure --workdir=runs/compose_measure [--seeds=3] [--config.compose.KEY=VALUE]

One VAE (`WORKDIR/vae`, trained if absent) shared by all seeds; per seed k a teacher pretrained with
`compose.teacher_seed = k` in `WORKDIR/seed<k>/teacher`, then the teacher rows of the report (28-step CFG,
4-step CFG with both schedules, 4-step without CFG) on the fixed evaluation set. Writes `WORKDIR/teacher_rows.md`
(mean ± std over seeds) and `teacher_rows.json` (every seed's numbers and the seconds of each phase).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from flowsteer_jax import cli

PROG = "flowsteer_jax.compose.measure"
METRICS = ("accuracy", "identity", "count", "position", "attribute", "fd", "mse_to_reference")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "output folder", flag_values=fv, required=True)
    config_flags.DEFINE_config_file(
        "config", os.path.join("configs", "digits_compose.py"), "the config file", flag_values=fv, lock_config=False
    )
    flags.DEFINE_integer("seeds", 3, "teacher seeds 0..N-1", flag_values=fv)
    flags.DEFINE_list(
        "guidances", [], "more CFG scales to evaluate the CFG rows at (rows `<row>@w<scale>`)", flag_values=fv
    )


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(define_flags, argv, prog=PROG, doc=__doc__)
    return cli.run(PROG, lambda: _main(args))


def _mean_std(values, digits: int = 3) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    return "—" if v.size == 0 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def _main(args) -> int:
    from flowsteer_jax.compose import world

    config = args.config
    config.compose.vae_dir = config.compose.vae_dir or os.path.join(args.workdir, "vae")
    out: dict = {"seeds": {}, "compose": config.compose.to_dict()}
    for seed in range(args.seeds):
        workdir = os.path.join(args.workdir, f"seed{seed}")
        config.compose.teacher_seed = seed
        config.compose.teacher_dir = os.path.join(workdir, "teacher")
        t = time.perf_counter()
        world.ensure_models(config, workdir)
        t_models = time.perf_counter() - t
        t = time.perf_counter()
        metrics = world.evaluate_models(config, workdir, None)
        base_w = config.compose.teacher_guidance
        for w in args.guidances:
            config.compose.teacher_guidance = float(w)
            cfg_rows = {k: v for k, v in world.TEACHER_ROWS.items() if v[2]}
            more = world.evaluate_models(config, workdir, None, rows=cfg_rows)
            metrics.update({f"{k}@w{float(w):g}": v for k, v in more.items()})
        config.compose.teacher_guidance = base_w
        out["seeds"][seed] = {"rows": metrics, "setup_seconds": t_models, "eval_seconds": time.perf_counter() - t}
        print(world.metrics_table(metrics), flush=True)
    rows = list(next(iter(out["seeds"].values()))["rows"])
    lines = [
        f"Teacher rows over {args.seeds} teacher seeds (mean ± std); {config.compose.to_dict()}",
        "",
        "| row | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for row in rows:
        cells = [
            _mean_std([s["rows"][row].get(m) for s in out["seeds"].values()], 4 if m.startswith("mse") else 3)
            for m in METRICS
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.workdir, "teacher_rows.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.workdir, "teacher_rows.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
