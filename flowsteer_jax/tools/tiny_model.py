"""Write a tiny random diffusers SD3 pipeline folder, to try the CLIs without SD3 weights.

    python -m flowsteer_jax.tools.tiny_model --out=/tmp/tiny_sd3 [--no_t5] [--seed=0]
    python -m flowsteer_jax.sample --model=/tmp/tiny_sd3 --prompts="a photo of a red cat" --out=/tmp/samples

Needs torch, transformers and diffusers (the folder is written by diffusers' own `save_pretrained`), and must
run from the repository root: it reuses the test helper `tests/tiny_pipeline.py`. The models are random, so
the images are noise-like; the point is that every component loads and runs. Tokenizers are built in code:
nothing is downloaded. Images are 32x32 (latents 16x16x16).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowsteer_jax.tools.tiny_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the pipeline to (created)")
    p.add_argument("--no_t5", action="store_true", help="save without T5 (as diffusers' text_encoder_3=None)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import jax  # noqa: F401  (before torch: both bundle their own runtimes)

        from tests.tiny_pipeline import write_tiny_pipeline
    except ImportError as e:
        print(f"needs torch, transformers, diffusers and the repository's tests/ folder: {e}", file=sys.stderr)
        return 1
    write_tiny_pipeline(args.out, with_t5=not args.no_t5, seed=args.seed)
    print(f"wrote a tiny random SD3 pipeline to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
