"""Jitted MMDiT forward vs diffusers' SD3Transformer2DModel forward: same weights, same inputs, one machine.

    python benchmarks/mmdit_forward.py [--repeats=10]

Prints ms/forward for both, their ratio (target: ours <= 0.5x diffusers on CPU), our one-time compile, and the
max relative difference of the outputs (both float32). torch is only the reference here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (before torch: both bundle runtimes)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from flowsteer_jax.models.loading import load_transformer  # noqa: E402

CONFIGS = {
    # name: (diffusers config, batch, latent size, text tokens)
    "small: 4 layers, 4x32 heads, 32x32x16, 77 tokens, batch 8": (
        dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, caption_projection_dim=128),
        8,
        32,
        77,
    ),
    "larger: 8 layers, 8x64 heads, 64x64x16, 154 tokens, batch 2": (
        dict(num_layers=8, num_attention_heads=8, attention_head_dim=64, caption_projection_dim=512),
        2,
        64,
        154,
    ),
}
COMMON = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048
)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(name: str, over: dict, batch: int, size: int, tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**COMMON, **over, pos_embed_max_size=96).eval()
    with torch.no_grad():  # adaLN-Zero / proj_out init at zero would make the output trivial
        for p in ref.parameters():
            p.normal_(0, 0.02)
    r = np.random.default_rng(0)
    x = r.standard_normal((batch, 16, size, size), dtype=np.float32)
    ctx = r.standard_normal((batch, tokens, 4096), dtype=np.float32)
    pool = r.standard_normal((batch, 2048), dtype=np.float32)
    t = r.uniform(0, 1000, batch).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = load_transformer(d)

    tx, tt, tc, tp = map(torch.from_numpy, (x, t, ctx, pool))

    def torch_fwd():
        with torch.no_grad():
            return ref(hidden_states=tx, timestep=tt, encoder_hidden_states=tc, pooled_projections=tp).sample

    fwd = jax.jit(lambda m, *a: m(*a))
    jx = jnp.asarray(x.transpose(0, 2, 3, 1))
    t0 = time.perf_counter()
    y = fwd(ours, jx, t, ctx, pool).block_until_ready()
    compile_s = time.perf_counter() - t0
    torch_fwd()  # warm-up
    ours_s = timed(lambda: fwd(ours, jx, t, ctx, pool).block_until_ready(), repeats)
    torch_s = timed(torch_fwd, repeats)
    ref_out = torch_fwd().numpy()
    err = np.abs(np.asarray(y).transpose(0, 3, 1, 2) - ref_out).max() / np.abs(ref_out).max()
    print(f"{name}")
    print(
        f"  diffusers {torch_s * 1e3:9.1f} ms   ours {ours_s * 1e3:9.1f} ms"
        f"   ratio ours/diffusers {ours_s / torch_s:.2f}x   (our compile {compile_s:.1f} s, max rel diff {err:.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0].platform
    print(f"jax {jax.__version__} on {device}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for name, (over, batch, size, tokens) in CONFIGS.items():
        run(name, over, batch, size, tokens, args.repeats)


if __name__ == "__main__":
    main()
