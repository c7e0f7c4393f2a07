"""Table 2 of the paper: the teacher sampled with N = 1, 2, 4, 8, 28 steps on both schedules.

    python benchmarks/schedule_table.py [--model=FOLDER] [--guidance=7] [--batch=4] [--steps=1,2,4,8,28]

For each schedule ("diffusers": FlowMatchEulerDiscreteScheduler's grid; "rectified": shift(linspace(1, 0, N + 1)))
and each N, samples the same prompts from the same noise and reports the distance to the reference, the
28-step sample on the diffusers schedule (the teacher's standard sampler): relative L2 of the latents and PSNR
of the decoded images. Also prints each schedule's sigmas for N = 4 and the smallest and largest step sizes.
Without `--model` it runs on the tiny random pipeline (`flowsteer_jax.tools.tiny_pipeline`, needs torch/diffusers to
write it): the numbers then only show the mechanics; the digits world (a trained teacher) replaces it later.
"""

from __future__ import annotations

import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from absl import flags

from flowsteer_jax import cli
from flowsteer_jax.models.loading import check_pipeline
from flowsteer_jax.pipeline import SD3Pipeline

PROMPTS = ["a photo of a red cat", "the blue cube on a sphere", "a dog in the red digit", "an blue sphere of cats"]
SCHEDULES = ("diffusers", "rectified")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def table(pipe: SD3Pipeline, prompts: list[str], steps: list[int], guidance: float, seed: int, max_seq: int) -> str:
    shape = pipe._latent_shape(len(prompts), None, None)
    noise = np.asarray(pipe.noise(shape, seed))
    kw = dict(guidance_scale=guidance, latents=noise, max_sequence_length=max_seq)

    def run(n: int, schedule: str) -> tuple[np.ndarray, np.ndarray]:
        lat = np.asarray(pipe(prompts, num_inference_steps=n, schedule=schedule, output_type="latent", **kw))
        img = pipe(prompts, num_inference_steps=n, schedule=schedule, output_type="np", **kw)
        return lat, img

    refs = {schedule: run(28, schedule) for schedule in SCHEDULES}
    ref_lat, ref_img = refs["diffusers"]
    lines = [
        f"reference: 28 steps, diffusers schedule, guidance {guidance}, batch {len(prompts)}, latents {shape}",
        "(last column: relative L2 of the latents to the same schedule's own 28-step sample)",
        f"{'schedule':<10} {'N':>3} {'rel L2 latents':>15} {'PSNR images dB':>15} {'min step':>9} {'max step':>9}"
        f" {'rel L2 own 28':>14}",
    ]
    for schedule in SCHEDULES:
        own_lat = refs[schedule][0]
        for n in steps:
            lat, img = refs[schedule] if n == 28 else run(n, schedule)
            d = -np.diff(pipe.sigmas(n, schedule))
            rel = float(np.linalg.norm(lat - ref_lat) / np.linalg.norm(ref_lat))
            own = float(np.linalg.norm(lat - own_lat) / np.linalg.norm(own_lat))
            lines.append(
                f"{schedule:<10} {n:>3} {rel:>15.4f} {psnr(img, ref_img):>15.2f} {d.min():>9.4f} {d.max():>9.4f}"
                f" {own:>14.4f}"
            )
    for schedule in SCHEDULES:
        grid = np.round(pipe.sigmas(4, schedule).astype(np.float64), 4).tolist()
        lines.append(f"sigmas N=4 {schedule:<10}: {grid}")
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "diffusers SD3 folder (default: write the tiny pipeline)", flag_values=fv)
    flags.DEFINE_float("guidance", 7.0, "CFG scale", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "prompts", flag_values=fv)
    flags.DEFINE_string("steps", "1,2,4,8,28", "step counts N (comma-separated)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "noise seed", flag_values=fv)
    flags.DEFINE_integer("max_sequence_length", 77, "T5 tokens", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(define_flags, argv, prog="benchmarks.schedule_table", doc=__doc__)
    steps = [int(s) for s in args.steps.split(",")]
    prompts = (PROMPTS * args.batch)[: args.batch]
    if args.model is None:
        from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline

        with tempfile.TemporaryDirectory() as folder:
            write_tiny_pipeline(folder)
            pipe = SD3Pipeline.from_pretrained(folder, dtype=jnp.float32)
        print("model: tiny random pipeline (flowsteer_jax/tools/tiny_pipeline.py)")
    else:
        check_pipeline(args.model, what="--model")
        pipe = SD3Pipeline.from_pretrained(args.model, dtype=jnp.float32)
        print(f"model: {args.model}")
    print(table(pipe, prompts, steps, args.guidance, args.seed, args.max_sequence_length))


if __name__ == "__main__":
    sys.exit(cli.run("benchmarks.schedule_table", main))
