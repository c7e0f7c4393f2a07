"""Peak memory of loading a sharded bf16 T5 checkpoint as bf16 (and, for contrast, as float32).

    python benchmarks/load_memory.py [--gb=1.0] [--shard-mb=256] [--no-fp32]

Writes a synthetic T5-XXL-shaped `text_encoder_3/` folder (d_model 4096, d_ff 10240, 64 heads, vocab 32128;
as many layers as fit in --gb) of bf16 shards to a temporary directory, then loads it with
`load_t5(folder, dtype)` in a fresh subprocess per dtype and prints that process's peak RSS next to the
checkpoint size. A thread samples /proc/self/status during the load, so the peak is split into anonymous memory
(arrays: what a widened fp32 copy would show up in) and file-backed pages (the memory-mapped shards, which the
kernel can drop at any time). Loading bf16 as bf16 should add about 1x the checkpoint in anonymous memory; a
float32 copy of it would add 2x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import flags

from conversion import t5 as t5_conv
from conversion.safetensors_io import save_checkpoint
from flowsteer_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu", num_layers=1
)
MB = 2**20


def write_checkpoint(folder: str, gb: float, shard_mb: int) -> int:
    """A T5-XXL-shaped bf16 checkpoint of about `gb` GB; returns its number of layers."""
    table = t5_conv.param_table(T5_XXL)
    embed = sum(np.prod(e.torch_shape) for e in table if e.torch_key == "shared.weight") * 2
    per_layer = sum(np.prod(e.torch_shape) for e in table if ".block.0." in e.torch_key) * 2
    layers = max(1, round((gb * 1e9 - embed) / per_layer))
    config = {**T5_XXL, "num_layers": layers}
    rng = np.random.default_rng(0)
    # Random bf16 bit patterns in [2^-11, 2^-5): cheap to make, and every byte differs from a zero page.
    tensors = {
        e.torch_key: rng.integers(0x3A00, 0x3D00, e.torch_shape, dtype=np.uint16).view(ml_dtypes.bfloat16)
        for e in t5_conv.param_table(config)
    }
    save_checkpoint(tensors, folder, name="model", max_shard_bytes=shard_mb * MB)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(t5_conv.to_transformers(config), f)
    return layers


def load_and_measure(folder: str, dtype: str) -> None:
    """Child process: load, then print the memory numbers as JSON."""
    import threading

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowsteer_jax.models.loading import load_t5

    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}

    before = status()
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = load_t5(folder, getattr(jnp, dtype))
    leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    after = status()
    for k, v in after.items():
        peak[k] = max(peak[k], v)
    print(
        json.dumps(
            {
                "before": before,
                "peak": peak,
                "after": after,
                "param_bytes": int(sum(x.nbytes for x in leaves)),
                "dtypes": sorted({str(x.dtype) for x in leaves}),
                "seconds": seconds,
            }
        )
    )


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_float("gb", 1.0, "checkpoint size to write", flag_values=fv)
    flags.DEFINE_integer("shard-mb", 256, "shard size", flag_values=fv)
    flags.DEFINE_bool("no-fp32", False, "skip the float32 contrast run", flag_values=fv)
    flags.DEFINE_string("load", None, "internal (the measuring child): load this FOLDER", flag_values=fv)
    flags.DEFINE_string("dtype", "bfloat16", "internal (the measuring child): load as this dtype", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(define_flags, argv, prog="benchmarks.load_memory", doc=__doc__)
    if args.load:
        load_and_measure(args.load, args.dtype)
        return

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        layers = write_checkpoint(tmp, args.gb, args.shard_mb)
        files = [n for n in os.listdir(tmp) if n.endswith(".safetensors")]
        size = sum(os.path.getsize(os.path.join(tmp, n)) for n in files)
        print(
            f"wrote a T5-XXL-shaped bf16 checkpoint: {layers} layers, {len(files)} shards, {size / MB:.0f} MiB "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        for dtype in ("bfloat16",) + (() if args.no_fp32 else ("float32",)):
            env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
            cmd = [sys.executable, "-m", "benchmarks.load_memory", "--load", tmp, "--dtype", dtype]
            out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            grown = r["peak"]["VmHWM"] - r["before"]["VmRSS"]
            anon = r["peak"]["RssAnon"] - r["before"]["RssAnon"]
            print(
                f"load as {dtype:8s}: params {r['param_bytes'] / MB:6.0f} MiB {r['dtypes']} in {r['seconds']:.1f} s | "
                f"RSS before {r['before']['VmRSS'] / MB:4.0f} MiB, peak {r['peak']['VmHWM'] / MB:5.0f} MiB "
                f"(+{grown / MB:.0f} MiB = {grown / size:.2f}x checkpoint) | anonymous +{anon / MB:.0f} MiB "
                f"= {anon / size:.2f}x | file-backed peak {r['peak']['RssFile'] / MB:.0f} MiB"
            )


if __name__ == "__main__":
    main()
