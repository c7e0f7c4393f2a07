"""Write a tiny random diffusers SD3 pipeline folder, to try the CLIs without SD3 weights.

    python -m flowsteer_jax.tools.tiny_model --out=/tmp/tiny_sd3 [--no_t5] [--seed=0]
    python -m flowsteer_jax.sample --model=/tmp/tiny_sd3 --prompts="a photo of a red cat" --out=/tmp/samples

Needs torch, transformers and diffusers (the folder is written by diffusers' own `save_pretrained`, see
`flowsteer_jax.tools.tiny_pipeline`). The models are random, so the images are noise-like; the point is that
every component loads and runs. Tokenizers are built in code: nothing is downloaded. Images are 32x32 (latents
16x16x16).
"""

from __future__ import annotations

import sys

from absl import flags

from flowsteer_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "folder to write the pipeline to (created)", flag_values=fv, required=True)
    flags.DEFINE_bool("no_t5", False, "save without T5 (as diffusers' text_encoder_3=None)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(define_flags, argv, prog="flowsteer_jax.tools.tiny_model", doc=__doc__)
    try:
        import jax  # noqa: F401  (before torch: both bundle their own runtimes)
        import torch  # noqa: F401
        from diffusers import StableDiffusion3Pipeline  # noqa: F401
    except ImportError as e:
        print(f"needs torch, transformers and diffusers: {e}", file=sys.stderr)
        return 1
    from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline

    write_tiny_pipeline(args.out, with_t5=not args.no_t5, seed=args.seed)
    print(f"wrote a tiny random SD3 pipeline to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
