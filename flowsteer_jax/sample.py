r"""Sample images from a diffusers SD3 folder with `SD3Pipeline` (teacher or distilled student).

    python -m flowsteer_jax.sample --model=FOLDER --prompts=FILE|--prompt=TEXT --steps=4 --schedule=rectified \
        --guidance=0 --out=DIR [--batch=4] [--seed=0] [--height=H --width=W] [--dtype=float32|bfloat16] \
        [--lora=PATH [--lora_scale=1.0]]

`--prompts` is a prompt file, read as the trainer reads `data.prompts` (`flowsteer_jax.data.load_prompts`: .txt
with one prompt a line, blank lines and `#` comment lines skipped; .jsonl; .parquet); `--prompt=TEXT` is one
literal prompt. A `--prompts` value that names no file and does not look like a path (no `/`, no prompt-file
extension) is taken as the prompt itself. A missing prompt file or model folder, a file with no prompts, a bad
`--lora`: one line `flowsteer_jax.sample: error: ...` on stderr, exit code 2.

Writes `DIR/00000.png`, ... (prompt order), `DIR/grid.png`, `DIR/prompts.txt` and the log `DIR/sample.log`, with a
progress bar over batches. DIR must be new or empty; `--overwrite` replaces an earlier sample output whole (never a
folder this program did not write, nor one inside a model, a workdir or a checkpoint: `flowsteer_jax.outputs`).
`--lora` applies a student LoRA first (`SD3Pipeline.load_lora`): a training workdir (its latest checkpoint), an
exported folder (`pytorch_lora_weights.safetensors`) or a `.safetensors` file in any published SD3 LoRA layout
(PEFT/diffusers, kohya/SAI, ComfyUI, OneTrainer), read against the model's transformer config before any model
loads.
Image `i` uses noise (`seed`, `i`) whatever `--batch` is, so reruns (and other models) compare image for image.
On a CPU-only machine the XLA:CPU inference flags of `flowsteer_jax.xla_cpu` are added to XLA_FLAGS (a flag
already set there wins).
Without SD3 weights, try it on a tiny random pipeline: `python -m flowsteer_jax.tools.tiny_model --out=DIR`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from conversion import sd3_transformer
from conversion import vae as vae_conv
from conversion.errors import ConversionError, InputError
from flowsteer_jax import cli, outputs
from flowsteer_jax.data import PROMPT_EXTENSIONS, DataError, load_prompts
from flowsteer_jax.distill.config import MAX_SEQUENCE_LENGTH, SEED_LIMIT
from flowsteer_jax.images import GRID, save_grid, save_png
from flowsteer_jax.models.loading import SD3_COMPONENTS, check_lora, check_pipeline
from flowsteer_jax.xla_cpu import use_inference_flags

PROG = "flowsteer_jax.sample"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def looks_like_path(arg: str) -> bool:
    """A path separator in it, or a prompt-file extension: meant as a file, never as a prompt."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in arg for sep in seps) or os.path.splitext(arg)[1].lower() in PROMPT_EXTENSIONS


def read_prompts(arg: str) -> list[str]:
    """`--prompts`: the prompts of the file `arg` (`load_prompts`), or `arg` itself where it is no file and no path."""
    if os.path.exists(arg) or looks_like_path(arg):
        if not os.path.exists(arg):
            raise InputError(f"--prompts={arg}: no such prompt file (for a literal prompt use --prompt=TEXT)")
        try:
            return load_prompts(arg)
        except DataError as e:
            raise DataError(f"--prompts: {e}") from e
    return [arg]


def check_sampling(args, models: Sequence[str]) -> None:
    """The sampling flags `sample` and `evaluate` share, checked before any model loads: one `InputError` naming
    each bad flag. `--height`/`--width` must be multiples of each model's VAE factor x patch size (read from the
    `config.json` files) and within its position table."""
    bad = [f"--{k}={getattr(args, k)} must be >= 1" for k in ("steps", "batch") if getattr(args, k) < 1]
    if not 0 <= args.seed < SEED_LIMIT:
        bad.append(f"--seed={args.seed} must be in [0, {SEED_LIMIT})")
    if not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        bad.append(f"--max_sequence_length={args.max_sequence_length} must be in [1, {MAX_SEQUENCE_LENGTH}]")
    sizes = {k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None}
    bad += [f"--{k}={v} must be >= 1" for k, v in sizes.items() if v < 1]
    for model in models if sizes and not bad else ():
        tc, _ = sd3_transformer.read_config(os.path.join(model, "transformer"))
        vc, _ = vae_conv.read_config(os.path.join(model, "vae"))
        f, p = 2 ** (len(vc["block_out_channels"]) - 1), tc["patch_size"]
        largest = tc["pos_embed_max_size"] * f * p
        for k, v in sizes.items():
            if v % (f * p) or v > largest:
                bad.append(
                    f"--{k}={v} must be a multiple of {f * p} (VAE factor {f} x patch size {p}) up to {largest} "
                    f"for --model={model}"
                )
    if bad:
        raise InputError("; ".join(bad))


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "model", None, "diffusers SD3 pipeline folder (model_index.json inside)", required=True, flag_values=fv
    )
    flags.DEFINE_string("prompts", None, "a prompt file (.txt, .jsonl, .parquet), or a prompt", flag_values=fv)
    flags.DEFINE_string("prompt", None, "one literal prompt (instead of --prompts)", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder for the PNGs and grid.png", required=True, flag_values=fv)
    flags.DEFINE_integer("steps", 4, "number of inference steps (model calls)", flag_values=fv)
    flags.DEFINE_enum("schedule", "rectified", ["rectified", "diffusers"], "sigma schedule", flag_values=fv)
    flags.DEFINE_float("guidance", 0.0, "CFG scale; <= 1 means no CFG (one forward/step)", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "negative prompt (with CFG)", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "prompts per jitted call (the last batch is padded)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "noise seed", flag_values=fv)
    flags.DEFINE_integer("height", None, "image height (default: the model's)", flag_values=fv)
    flags.DEFINE_integer("width", None, "image width (default: the model's)", flag_values=fv)
    flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "compute dtype", flag_values=fv)
    flags.DEFINE_bool("no_t5", False, "skip the T5 encoder (its tokens become zeros)", flag_values=fv)
    flags.DEFINE_string("lora", None, "student LoRA: training workdir, exported folder or .safetensors", flag_values=fv)
    flags.DEFINE_float("lora_scale", 1.0, "multiplies the LoRA's effect (with --lora)", flag_values=fv)
    flags.DEFINE_bool(
        "overwrite", False, "replace an earlier output of this program at --out (all of it)", flag_values=fv
    )


def parse_args(argv: list[str] | None = None):
    return cli.parse(define_flags, argv, prog=PROG, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.prompts is None) == (args.prompt is None):
        cli.fail(PROG, "give one of --prompts=FILE and --prompt=TEXT")
    return cli.run(PROG, lambda: _main(args))


def _main(args) -> int:
    if args.lora is not None and not os.path.exists(args.lora):
        raise InputError(f"--lora={args.lora}: no such file or folder")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    skip_t5 = ("text_encoder_3", "tokenizer_3") if args.no_t5 else ()
    check_pipeline(args.model, [n for n in SD3_COMPONENTS if n not in skip_t5], what="--model")
    check_sampling(args, [args.model])
    if args.lora is not None:
        try:
            check_lora(args.lora, args.model)
        except (ConversionError, FileNotFoundError) as e:
            raise InputError(f"--lora={args.lora}: {e}") from e
    output = outputs.prepare_output(args.out, PROG, overwrite=args.overwrite, inputs=[args.model, args.lora])
    with output, cli.log_to(output.log_file):
        count = _sample(args, prompts, output.dir)
        output.commit()
    print(f"wrote {count} images and grid.png to {args.out}", file=sys.stderr)
    return 0


def _sample(args, prompts: list[str], out: str) -> int:
    """Load the pipeline (and LoRA), write the images, grid.png and prompts.txt into `out`; the image count."""
    from flowsteer_jax.pipeline import SD3Pipeline

    t0 = time.perf_counter()
    pipe = SD3Pipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], t5=not args.no_t5)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.lora is not None:
        try:
            adapted = pipe.load_lora(args.lora, scale=args.lora_scale)
        except (ConversionError, FileNotFoundError) as e:
            raise InputError(f"--lora={args.lora}: {e}") from e
        print(f"applied LoRA {args.lora} to {len(adapted)} layers (scale {args.lora_scale:g})", file=sys.stderr)
    paths = write_images(
        pipe,
        prompts,
        out,
        batch=args.batch,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        schedule=args.schedule,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length,
    )
    images = [Image.open(p) for p in paths]
    pixels = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images])
    save_grid(os.path.join(out, GRID), pixels, cols=math.ceil(math.sqrt(len(images))), border=0)
    with open(os.path.join(out, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    print(f"sampled {len(images)} images ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return len(images)


def write_images(pipe, prompts: list[str], out: str, *, batch: int, seed: int, desc: str = "", **sampling) -> list[str]:
    """Sample `prompts` with `pipe` in batches of `batch` and write `out/00000.png`, ... (prompt order).

    Image `i` starts from `pipe.noise(..., seed, i)`: the same image whatever the batch size, and the same noise for
    every model sampled with the same seed (teacher and student compare image for image). The last batch is padded
    with its last prompt, so every call has one shape (one compile). `sampling`: `SD3Pipeline.__call__` keywords.
    Returns the written paths.
    """
    os.makedirs(out, exist_ok=True)
    paths = []
    starts = range(0, len(prompts), batch)
    for start in tqdm(starts, desc=desc or f"sampling {len(prompts)} prompts", unit="batch"):
        chunk = prompts[start : start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        images = pipe(padded, seed=seed, first_index=start, output_type="pil", **sampling)
        for i, im in enumerate(images[: len(chunk)]):
            paths.append(os.path.join(out, f"{start + i:05d}.png"))
            save_png(paths[-1], im)
    return paths


def run() -> int:
    """The program (`python -m flowsteer_jax.sample`, `flowsteer-sample`): the XLA:CPU inference flags, then main.

    Here, not in main(): XLA reads its flags once, when the first computation creates the backends, and an
    in-process main() (tests) would only leak them into the environment of later subprocesses.
    """
    use_inference_flags()
    return main()


if __name__ == "__main__":
    sys.exit(run())
