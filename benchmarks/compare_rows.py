"""One ablation row of two runs, side by side, with its statistics: per metric the mean ± sample std over seeds of
each, the difference, Welch's p and the paired-by-seed p (seed k of both rows shares the evaluation prompts and
noises).

    python benchmarks/compare_rows.py runs/ema_off/digits_ablation.json runs/ema_on/digits_ablation.json --row=full

The files are `digits.ablate`'s `<config>_ablation.json` (`{row: {metric: [one value per seed]}}`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from flowsteer_jax.digits.ablate import paired_p, welch_p


def compare(a: dict, b: dict, row: str) -> list[tuple[str, list[float], list[float], float, float]]:
    """(metric, a's values, b's values, Welch p, paired p) for every metric both files hold for `row`."""
    for name, d in (("first", a), ("second", b)):
        if row not in d:
            raise SystemExit(f"compare_rows: error: the {name} file has no row {row!r} (rows: {sorted(d)})")
    out = []
    for metric in [m for m in a[row] if m in b[row]]:
        x, y = [float(v) for v in a[row][metric]], [float(v) for v in b[row][metric]]
        out.append((metric, x, y, welch_p(x, y), paired_p(x, y) if len(x) == len(y) else float("nan")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--row", default="full")
    args = parser.parse_args()
    with open(args.first) as f, open(args.second) as g:
        a, b = json.load(f), json.load(g)
    print(f"row {args.row}: {args.first} (A) vs {args.second} (B)")
    print("| metric | A | B | B - A | Welch p | paired p | seeds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for metric, x, y, pw, pp in compare(a, b, args.row):
        sd = lambda v: np.std(v, ddof=1) if len(v) > 1 else float("nan")  # noqa: E731
        print(
            f"| {metric} | {np.mean(x):.4f} ± {sd(x):.4f} | {np.mean(y):.4f} ± {sd(y):.4f} | "
            f"{np.mean(y) - np.mean(x):+.4f} | {pw:.3g} | {pp:.3g} | {len(x)}, {len(y)} |"
        )


if __name__ == "__main__":
    main()
