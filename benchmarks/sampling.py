"""4-step batch sampling, ours (`SD3Pipeline`) vs diffusers' `StableDiffusion3Pipeline`, side by side.

    python benchmarks/sampling.py [--batch=4] [--steps=4] [--repeats=3] [--guidance=0] [--torch_threads=N]

Both pipelines load the same saved folder: the test helper's tiny pipeline (tokenizers, text encoders) with a
larger random transformer (4 layers, 4x32 heads, 32x32x16 latents = 256 image tokens) and VAE (32/64 channels,
64x64 images), both float32. Timed: prompt encoding + denoising + VAE decode to numpy images, same noise. Prints
ms/call for both (best of interleaved repeats), the ratio (target: ours <= 0.5x diffusers on CPU), our one-time
compile (first call minus a warm call) and the max relative difference of the images. On a small shared CPU,
torch's OpenMP threads can collapse next to XLA's thread pool: compare with `--torch_threads=1` too.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax  # before torch: both bundle runtimes
import jax.numpy as jnp
import numpy as np
import torch
from absl import flags
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

from flowsteer_jax import cli
from flowsteer_jax.pipeline import SD3Pipeline
from flowsteer_jax.tools.randomize import randomize_
from flowsteer_jax.tools.tiny_pipeline import CLIP_G, CLIP_L, T5, write_tiny_pipeline
from flowsteer_jax.xla_cpu import use_inference_flags

PROMPTS = ["a photo of a red cat", "the blue cube on a sphere", "a dog in the red digit", "an blue sphere of cats"]
MAX_SEQ = 64


def write_bench_pipeline(folder: str) -> None:
    """`write_tiny_pipeline` with its transformer and VAE swapped for larger random ones."""
    write_tiny_pipeline(folder)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=T5["d_model"],
        caption_projection_dim=128,
        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
        out_channels=16,
        pos_embed_max_size=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    randomize_(transformer.eval(), 10).save_pretrained(os.path.join(folder, "transformer"))
    randomize_(vae.eval(), 11).save_pretrained(os.path.join(folder, "vae"))


def _time_interleaved(fns, repeats: int) -> list[float]:
    """Best ms/call of each function, calls interleaved so that machine load hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("batch", 4, "prompts per call", flag_values=fv)
    flags.DEFINE_integer("steps", 4, "sampling steps", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed repeats (best of)", flag_values=fv)
    flags.DEFINE_float("guidance", 0.0, "<= 1: no CFG (the student); > 1: CFG", flag_values=fv)
    flags.DEFINE_enum("schedule", "rectified", ["rectified", "diffusers"], "sigma schedule", flag_values=fv)
    flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: torch's own)", flag_values=fv)
    help_ = "leave XLA_FLAGS as they are (the sample CLI adds INFERENCE_FLAGS)"
    flags.DEFINE_bool("xla_defaults", False, help_, flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(define_flags, argv, prog="benchmarks.sampling", doc=__doc__)
    if not args.xla_defaults:
        use_inference_flags()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    prompts = (PROMPTS * args.batch)[: args.batch]
    noise = np.random.default_rng(0).standard_normal((args.batch, 16, 32, 32)).astype(np.float32)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, max_sequence_length=MAX_SEQ)
    sigmas = {"sigmas": list(np.linspace(1.0, 0.0, args.steps + 1)[:-1])} if args.schedule == "rectified" else {}

    with tempfile.TemporaryDirectory() as folder:
        write_bench_pipeline(folder)
        ref = StableDiffusion3Pipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        ours = SD3Pipeline.from_pretrained(folder, dtype=jnp.float32)

    def run_ref():
        with torch.inference_mode():
            return ref(prompt=prompts, latents=torch.from_numpy(noise), output_type="np", **sigmas, **kw).images

    def run_ours():
        return ours(prompts, schedule=args.schedule, latents=noise, output_type="np", **kw)

    t0 = time.perf_counter()
    got = run_ours()
    first = (time.perf_counter() - t0) * 1e3
    want = run_ref()
    ms_ours, ms_ref = _time_interleaved([run_ours, run_ref], args.repeats)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    threads = torch.get_num_threads()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} ({threads} threads)")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(
        f"batch {args.batch}, {args.steps} steps, {args.schedule} schedule, guidance {args.guidance}, 64x64 images, "
        f"best of {args.repeats}"
    )
    print(f"  diffusers: {ms_ref:9.1f} ms/call")
    print(f"  ours:      {ms_ours:9.1f} ms/call   ratio {ms_ours / ms_ref:.2f}x (target <= 0.5x)")
    print(f"  our one-time compile: {(first - ms_ours) / 1e3:.2f} s; max relative image difference {err:.1e}")


if __name__ == "__main__":
    sys.exit(cli.run("benchmarks.sampling", main))
