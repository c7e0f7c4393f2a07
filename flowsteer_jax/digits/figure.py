"""A figure for docs/: the same evaluation prompts and noises, one grid row per sampled row of a toy-world run.

    python -m flowsteer_jax.digits.figure --run=runs/compose --out=docs/compose_samples.png \
        [--rows=teacher_28_diffusers,teacher_4_diffusers,teacher_4_rectified_nocfg,student_4] [--n=12] [--scale=4]

Reads `RUN/samples/<row>.npz` (written by a run's report, `python -m flowsteer_jax.train` in a toy world) and
prints the prompts of the columns, in order.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from conversion.errors import InputError
from flowsteer_jax import cli

PROG = "flowsteer_jax.digits.figure"
DEFAULT_ROWS = ("teacher_28_diffusers", "teacher_4_diffusers", "teacher_4_rectified_nocfg", "student_4")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("run", None, "a toy-world training workdir", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "the PNG to write", flag_values=fv, required=True)
    flags.DEFINE_list("rows", list(DEFAULT_ROWS), "sampled rows, top to bottom", flag_values=fv)
    flags.DEFINE_integer("n", 12, "columns: the first N evaluation prompts", flag_values=fv)
    flags.DEFINE_integer("scale", 4, "pixel scale", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(define_flags, argv, prog=PROG, doc=__doc__)
    return cli.run(PROG, lambda: _main(args))


def _main(args) -> int:
    from flowsteer_jax.digits.world import read_run
    from flowsteer_jax.images import save_grid

    config, world = read_run(args.run)
    images = []
    for row in args.rows:
        path = os.path.join(args.run, "samples", f"{row}.npz")
        if not os.path.isfile(path):
            raise InputError(f"--rows: {path} does not exist (rows of this run: see {args.run}/samples/)")
        with np.load(path) as f:
            x = np.asarray(f["images"][: args.n], np.float32)
        images.append(x[..., None] if x.ndim == 3 else x)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(args.out, np.concatenate(images), cols=len(images[0]), scale=args.scale)
    print(f"{args.out}: rows {', '.join(args.rows)}; columns: {world.eval_prompts_of(config)[: args.n]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
