"""One-GPU device check: bf16 parity with diffusers, SD3-Medium forward, a real train step, 4-step sampling.

    bash benchmarks/device_check.sh [--config=configs/sd3_medium.py] [--set train.batch_size=2 ...]
    python benchmarks/device_check.py --small        # every part at toy sizes: the plumbing, on a CPU

Meant for one H100/H200 and a short session (under 8 minutes): each part runs on its own, a failing part
prints its traceback and the next one starts, and a watchdog prints what has finished when `--budget_s`
runs out. Parts, in run order (`--parts` picks some; the labels follow the brief's numbering):

- 1a `parity_mmdit`: our `MMDiT` in bf16 (loaded by `load_transformer` from a diffusers `save_pretrained`
  folder, every weight re-randomised) vs diffusers' `SD3Transformer2DModel` in bf16, both vs diffusers fp32
  (TF32 off): max|difference| / max|fp32 output|; also ours fp32 (XLA attention, "highest" matmuls) vs it.
- 1b `parity_pipeline`: `SD3Pipeline` vs diffusers' `StableDiffusion3Pipeline`, both bf16 (and diffusers fp32
  for scale), on the tiny random pipeline of `flowsteer_jax.tools.tiny_model`, same noise, 4 steps, the
  "diffusers" schedule, guidance 0 and 5: max |image difference| (images in [0, 1]).
- 2 `forward`: SD3-Medium (random weights, bf16) at 1024² (latents 128x128x16, 333 tokens, batch 2): ours
  jitted with the platform's attention (cuDNN flash on GPU) vs diffusers (SDPA): ms (median of 10), TFLOP/s
  (matmul FLOPs of the jaxpr traced with XLA attention: flash kernels are opaque custom calls, same arithmetic).
- 4 `sampling`: images/s of 4-step Euler + VAE decode at 1024², batch 4, no CFG, precomputed random prompt
  embeddings: our jitted `_denoise_decode` vs diffusers' pipeline (eager), images copied to the host by both.
- 3 `train`: the FlowSteer step of `--config` at real shapes on random weights: compile time, s/step (median of
  3 after a warm-up), MFU = matmul FLOPs (remat recomputation included) / (s/step x 989 TFLOP/s bf16 peak),
  device peak memory next to XLA's prediction (arguments + temporaries + outputs - aliased).
- 4 `sampling_compiled`: diffusers again with `torch.compile` on its transformer, only while
  `--torch_compile_budget_s` are left (its compile cannot be interrupted).

Prints one labelled line per measurement (repeated in a summary at the end) and, last, one JSON object with
every number, the devices, and which parts failed or were skipped. JAX and torch share the GPU: run it with
`XLA_PYTHON_CLIENT_PREALLOCATE=false` (the .sh sets it). torch empties its cache after each part but JAX's pool
never shrinks, hence the order: the train step, JAX's peak, after the torch-heavy parts, and its "device peak"
is the process's (the peak before its steps is printed next to it).
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax  # before torch: both bundle their own runtimes
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from absl import flags
from flax import nnx

from flowsteer_jax import chips, cli
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig
from flowsteer_jax.models.presets import CLIP_TOKENS, SD3_VAE, TRANSFORMERS
from flowsteer_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from flowsteer_jax.tools.randomize import randomize_

# Run order. The train step (JAX's memory peak: its pool never shrinks, torch's cache is emptied after each part)
# comes after the torch-heavy parts; diffusers + torch.compile (long compile, least needed) is last.
PARTS = ("parity_mmdit", "parity_pipeline", "forward", "sampling", "train", "sampling_compiled")
DEFAULT_CONFIG = "configs/sd3_medium.py"  # the paper's setting; fits one 80 GB GPU (README chip table)
PEAK_BF16_FLOPS = chips.CHIPS["h100"].peak_bf16_tflops * 1e12  # H100 and H200: the same dense bf16 peak
GiB = 2**30
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 4  # the student's sampling steps
PROMPTS = ["a photo of a red cat", "the blue cube on a sphere"]  # tiny pipeline's vocabulary


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the parts use: the real ones on a GPU, toy ones with `--small`."""

    parity: dict[str, Any]  # diffusers SD3Transformer2DModel kwargs of the parity model
    parity_batch: int
    parity_tokens: int
    mmdit: MMDiTConfig  # forward and sampling
    train_mmdit: MMDiTConfig | None  # None: the train config's `model.preset`
    vae: AutoencoderKLConfig
    forward_batch: int
    tokens: int  # 77 CLIP + T5 tokens
    sample_batch: int
    image_px: int
    repeats: int  # timed forwards
    sample_repeats: int  # timed sampling calls


def _parity_config(layers: int, heads: int, head_dim: int, joint: int, caption: int, pooled: int, size: int) -> dict:
    return dict(
        sample_size=size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        joint_attention_dim=joint,
        caption_projection_dim=caption,
        pooled_projection_dim=pooled,
        pos_embed_max_size=size,
    )


FULL = Sizes(
    parity=_parity_config(4, 8, 64, 256, 512, 128, 64),
    parity_batch=2,
    parity_tokens=CLIP_TOKENS + 77,
    mmdit=TRANSFORMERS["sd3_medium"],
    train_mmdit=None,
    vae=SD3_VAE,
    forward_batch=2,
    tokens=CLIP_TOKENS + 256,
    sample_batch=4,
    image_px=1024,
    repeats=10,
    sample_repeats=3,
)
SMALL = Sizes(
    parity=_parity_config(2, 2, 32, 64, 64, 32, 16),
    parity_batch=2,
    parity_tokens=24,
    mmdit=MMDiTConfig(**_parity_config(2, 2, 32, 64, 64, 32, 16)),
    train_mmdit=MMDiTConfig(**_parity_config(2, 2, 32, 64, 64, 32, 16)),
    vae=dataclasses.replace(SD3_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    forward_batch=2,
    tokens=CLIP_TOKENS + 16,
    sample_batch=2,
    image_px=64,
    repeats=3,
    sample_repeats=2,
)
# --small's shrinking of the train config (on top of --config and --set).
SMALL_TRAIN = {
    "model.latent_shape": (16, 16, 16),
    "train.batch_size": 2,
    "distill.teacher_steps": 4,
    "disc.num_blocks": 1,
    "lora.rank": 4,
    "lora.alpha": 4.0,
    "data.max_sequence_length": 16,
}


# --- bookkeeping: results, labelled lines, the deadline ---


@dataclasses.dataclass
class Report:
    start: float
    budget_s: float
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    lines: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    running: str | None = None
    done: bool = False  # set (under the lock) once the final summary is printed: the watchdog stays quiet
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def line(self, label: str, text: str) -> None:
        """A labelled result line, printed now and again in the final summary."""
        msg = f"[{label}] {text}"
        with self.lock:
            self.lines.append(msg)
        print(msg, flush=True)

    def summary(self) -> str:
        with self.lock:
            out = {
                **self.results,
                "failed": dict(self.failed),
                "skipped": dict(self.skipped),
                "total_s": time.perf_counter() - self.start,
            }
            lines = list(self.lines)
        text = "\n".join(["=== summary ===", *lines, *(f"[FAILED {k}] {v}" for k, v in out["failed"].items())])
        return text + "\n" + json.dumps(out, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    return str(x)


def _start_watchdog(report: Report) -> None:
    """Print what has finished and exit before the shell's `timeout` kills the process with nothing printed."""

    def fire() -> None:
        with report.lock:
            if report.done:
                return
            report.failed[report.running or "startup"] = f"timed out: the {report.budget_s:.0f} s budget ran out"
            for _ in range(3):  # the main thread may be adding a number right now
                try:
                    print(report.summary(), flush=True)
                    break
                except RuntimeError:
                    time.sleep(0.1)
            os._exit(124)

    timer = threading.Timer(max(report.time_left(), 0.0), fire)
    timer.daemon = True
    timer.start()


def _free() -> None:
    """Drop the finished part's arrays: torch returns its cache to the driver, JAX keeps its pool for reuse."""
    gc.collect()
    if TORCH_DEVICE == "cuda":
        torch.cuda.empty_cache()


def _sync_torch() -> None:
    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def _median_s(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` (which must block until its work is done) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GiB if "peak_bytes_in_use" in stats else None


def _predicted_gib(compiled) -> float | None:
    m = chips.memory_gib(compiled)
    return None if m is None else m["total_gib"]


# --- models at random weights ---


def _random_module(build: Callable[[], nnx.Module]) -> nnx.Module:
    """`build()` with its random init compiled for the default device: 2 B weights never exist on the host."""
    graph, _ = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()))()
    return nnx.merge(graph, state)


def _mmdit(cfg: MMDiTConfig, implementation: str | None = None, seed: int = 0) -> MMDiT:
    return _random_module(lambda: MMDiT(cfg, rngs=nnx.Rngs(seed), dtype=jnp.bfloat16, implementation=implementation))


def _diffusers_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _torch_mmdit(cfg: MMDiTConfig) -> torch.nn.Module:
    """diffusers' SD3Transformer2DModel, randomly initialised on the torch device itself, in bf16."""
    from diffusers import SD3Transformer2DModel

    with torch.device(TORCH_DEVICE):
        return SD3Transformer2DModel(**_diffusers_kwargs(cfg.to_diffusers())).to(torch.bfloat16).eval()


# --- 1. parity ---


def _parity_inputs(sizes: Sizes) -> tuple[np.ndarray, ...]:
    """NCHW latents, timesteps, prompt tokens, pooled; rounded to bf16 so every run sees the same values."""
    c, r = sizes.parity, np.random.default_rng(1)
    b, n = sizes.parity_batch, c["sample_size"]
    bf16 = lambda a: a.astype(jnp.bfloat16).astype(np.float32)  # noqa: E731
    x = bf16(r.standard_normal((b, c["in_channels"], n, n), dtype=np.float32))
    ctx = bf16(r.standard_normal((b, sizes.parity_tokens, c["joint_attention_dim"]), dtype=np.float32))
    pooled = bf16(r.standard_normal((b, c["pooled_projection_dim"]), dtype=np.float32))
    t = r.uniform(0, 1000, b).astype(np.float32)
    return x, t, ctx, pooled


def _torch_forward(model: torch.nn.Module, dtype: torch.dtype, x, t, ctx, pooled) -> np.ndarray:
    dev = lambda a, d=dtype: torch.from_numpy(a).to(TORCH_DEVICE, d)  # noqa: E731
    with torch.inference_mode():
        out = model(
            hidden_states=dev(x),
            timestep=dev(t, torch.float32),
            encoder_hidden_states=dev(ctx),
            pooled_projections=dev(pooled),
        ).sample
    return out.float().cpu().numpy()


def _jax_forward(model: MMDiT, x, t, ctx, pooled) -> np.ndarray:
    """NCHW in and out, like diffusers; inputs cast to the model's dtype as the pipeline does."""
    fwd = nnx.jit(lambda m, *a: m(*a))
    xs = jnp.asarray(x.transpose(0, 2, 3, 1), model.dtype)
    out = fwd(model, xs, jnp.asarray(t), jnp.asarray(ctx, model.dtype), jnp.asarray(pooled, model.dtype))
    return np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)


def part_parity_mmdit(report: Report, sizes: Sizes, config, out: dict) -> None:
    from diffusers import SD3Transformer2DModel

    from flowsteer_jax.models.loading import load_transformer

    # The fp32 reference must be true fp32: no TF32 in torch's matmuls/convs, "highest" for our fp32 check.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = randomize_(SD3Transformer2DModel(**sizes.parity).eval(), seed=0)
    inputs = _parity_inputs(sizes)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours16 = load_transformer(folder, jnp.bfloat16)
        ours32 = load_transformer(folder, jnp.float32, implementation="xla")  # flash kernels take no fp32
    o16 = _jax_forward(ours16, *inputs)
    with jax.default_matmul_precision("highest"):
        o32 = _jax_forward(ours32, *inputs)
    d32 = _torch_forward(ref.to(TORCH_DEVICE), torch.float32, *inputs)
    d16 = _torch_forward(ref.to(TORCH_DEVICE, torch.bfloat16), torch.bfloat16, *inputs)
    scale = float(np.abs(d32).max())
    rel = lambda a, b: float(np.abs(a - b).max() / scale)  # noqa: E731
    out.update(
        ours_bf16_vs_diffusers_bf16=rel(o16, d16),
        ours_bf16_vs_diffusers_fp32=rel(o16, d32),
        diffusers_bf16_vs_diffusers_fp32=rel(d16, d32),
        ours_fp32_vs_diffusers_fp32=rel(o32, d32),
        max_abs_fp32_output=scale,
        finite=bool(np.isfinite(o16).all()),
    )
    c = sizes.parity
    shape = (
        f"{c['num_layers']} layers, {c['num_attention_heads']}x{c['attention_head_dim']} heads, "
        f"{sizes.parity_batch}x{c['sample_size']}^2 latents, {sizes.parity_tokens} tokens"
    )
    report.line(
        "1a parity MMDiT bf16",
        f"({shape}) max|diff| / max|fp32 out| ({scale:.2f}): ours-vs-diffusers "
        f"{out['ours_bf16_vs_diffusers_bf16']:.2e}, ours-vs-fp32 {out['ours_bf16_vs_diffusers_fp32']:.2e}, "
        f"diffusers-vs-fp32 {out['diffusers_bf16_vs_diffusers_fp32']:.2e}; fp32 ours-vs-diffusers "
        f"{out['ours_fp32_vs_diffusers_fp32']:.2e}",
    )


def part_parity_pipeline(report: Report, sizes: Sizes, config, out: dict) -> None:
    from diffusers import StableDiffusion3Pipeline

    from flowsteer_jax.pipeline import SD3Pipeline
    from flowsteer_jax.tools import tiny_model

    with tempfile.TemporaryDirectory() as folder:
        if tiny_model.main([f"--out={folder}"]) != 0:
            raise RuntimeError("flowsteer_jax.tools.tiny_model could not write the tiny pipeline")
        refs = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            refs[name] = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype).to(TORCH_DEVICE)
            refs[name].set_progress_bar_config(disable=True)
        ours = SD3Pipeline.from_pretrained(folder, dtype=jnp.bfloat16)
        shape = ours._latent_shape(len(PROMPTS), None, None)
        noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        kw = dict(num_inference_steps=STEPS, max_sequence_length=16, output_type="np")
        for guidance in (0.0, 5.0):
            want = {
                name: ref(prompt=PROMPTS, latents=torch.from_numpy(noise), guidance_scale=guidance, **kw).images
                for name, ref in refs.items()
            }
            got = ours(PROMPTS, guidance_scale=guidance, schedule="diffusers", latents=noise, **kw)
            key = f"guidance_{guidance:g}"
            out[key] = {
                "ours_bf16_vs_diffusers_bf16": float(np.abs(got - want["bf16"]).max()),
                "ours_bf16_vs_diffusers_fp32": float(np.abs(got - want["fp32"]).max()),
                "diffusers_bf16_vs_diffusers_fp32": float(np.abs(want["bf16"] - want["fp32"]).max()),
            }
            r = out[key]
            report.line(
                f"1b parity pipeline bf16 w={guidance:g}",
                f"({len(PROMPTS)}x{got.shape[1]}^2 images, {STEPS} steps) max|image diff|: ours-vs-diffusers "
                f"{r['ours_bf16_vs_diffusers_bf16']:.2e}, ours-vs-fp32 {r['ours_bf16_vs_diffusers_fp32']:.2e}, "
                f"diffusers-vs-fp32 {r['diffusers_bf16_vs_diffusers_fp32']:.2e}",
            )


# --- 2. forward ---


def _forward_inputs(cfg: MMDiTConfig, b: int, tokens: int, abstract: bool = False) -> tuple:
    """(NHWC latents, timesteps, prompt tokens, pooled), bf16 but the timesteps; ShapeDtypeStructs if abstract."""
    n = cfg.sample_size
    specs = (
        ((b, n, n, cfg.in_channels), jnp.bfloat16),
        ((b,), jnp.float32),
        ((b, tokens, cfg.joint_attention_dim), jnp.bfloat16),
        ((b, cfg.pooled_projection_dim), jnp.bfloat16),
    )
    if abstract:
        return tuple(jax.ShapeDtypeStruct(s, d) for s, d in specs)
    keys = jax.random.split(jax.random.key(0), len(specs))
    arrays = tuple(jax.random.normal(k, s, d) for k, (s, d) in zip(keys, specs, strict=True))
    return (arrays[0], jnp.abs(arrays[1]) * 300.0, *arrays[2:])


def _forward_flops(cfg: MMDiTConfig, b: int, tokens: int) -> float:
    """Matmul FLOPs of one forward, traced with XLA attention (flash kernels are opaque custom calls)."""
    model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, implementation="xla"))
    graph, state = nnx.split(model)
    fn = jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))
    return chips.matmul_flops(fn.trace(state, *_forward_inputs(cfg, b, tokens, abstract=True)).jaxpr)


def _ours_forward(cfg: MMDiTConfig, b: int, tokens: int, repeats: int) -> dict:
    graph, state = nnx.split(_mmdit(cfg))  # implementation=None: the platform's kernel (cuDNN flash on GPU)
    inputs = _forward_inputs(cfg, b, tokens)
    fwd = jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, *inputs).compile()
    compile_s = time.perf_counter() - t0
    seconds = _median_s(lambda: compiled(state, *inputs).block_until_ready(), repeats, warmup=2)
    return {"ms": seconds * 1e3, "compile_s": compile_s, "kernels": chips.custom_calls(compiled)}


def _diffusers_forward(cfg: MMDiTConfig, b: int, tokens: int, repeats: int) -> dict:
    model = _torch_mmdit(cfg)
    n = cfg.sample_size
    with torch.device(TORCH_DEVICE):
        x = torch.randn(b, cfg.in_channels, n, n, dtype=torch.bfloat16)
        t = torch.rand(b) * 1000
        ctx = torch.randn(b, tokens, cfg.joint_attention_dim, dtype=torch.bfloat16)
        pooled = torch.randn(b, cfg.pooled_projection_dim, dtype=torch.bfloat16)

    def run() -> None:
        with torch.inference_mode():
            model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
        _sync_torch()

    return {"ms": _median_s(run, repeats, warmup=2) * 1e3}


def part_forward(report: Report, sizes: Sizes, config, out: dict) -> None:
    cfg, b, tokens, n = sizes.mmdit, sizes.forward_batch, sizes.tokens, sizes.mmdit.sample_size
    flops = _forward_flops(cfg, b, tokens)
    out["tflop_per_forward"] = flops / 1e12
    ours = _ours_forward(cfg, b, tokens, sizes.repeats)
    out.update(
        ours_ms=ours["ms"],
        ours_compile_s=ours["compile_s"],
        ours_tflops_per_s=flops / ours["ms"] * 1e-9,
        flash_attention=any("fmha" in k for k in ours["kernels"]),
        kernels=ours["kernels"],
    )
    report.line(
        "2 forward ours",
        f"{cfg.num_layers}-layer MMDiT bf16, batch {b}, {n}x{n}x{cfg.in_channels} latents, {tokens} tokens "
        f"({out['tflop_per_forward']:.3g} TFLOP): {ours['ms']:.1f} ms, {out['ours_tflops_per_s']:.3g} TFLOP/s, "
        f"compile {ours['compile_s']:.1f} s, cuDNN flash attention: {out['flash_attention']}",
    )
    _free()
    ref = _diffusers_forward(cfg, b, tokens, sizes.repeats)
    out.update(
        diffusers_ms=ref["ms"],
        diffusers_tflops_per_s=flops / ref["ms"] * 1e-9,
        ratio_ours_over_diffusers=ours["ms"] / ref["ms"],
    )
    report.line(
        "2 forward diffusers",
        f"SDPA: {ref['ms']:.1f} ms, {out['diffusers_tflops_per_s']:.3g} TFLOP/s; ours/diffusers time "
        f"{out['ratio_ours_over_diffusers']:.3g}x",
    )


# --- 3. train step ---


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """`config.<key> = value` for an existing dotted key (a typo raises instead of adding a key)."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = getattr(node, p)
    if leaf not in node:
        raise KeyError(f"unknown config key {key!r}")
    setattr(node, leaf, value)


def _parse_value(text: str) -> Any:
    """Python literals (numbers, tuples, booleans) as such; anything else as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str, overrides: list[str], small: bool) -> tuple[ml_collections.ConfigDict, str]:
    """The train config of `path` (`get_config()`) with `key=value` overrides; returns (config, description)."""
    overrides = list(overrides)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config={path}: no such file")
    spec = importlib.util.spec_from_file_location("device_check_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        _set(config, key.strip(), _parse_value(value.strip()))
    if small:
        for key, value in SMALL_TRAIN.items():
            _set(config, key, value)
    return config, " ".join([path, *overrides, *(["(small sizes)"] if small else [])])


def _train_batch(config, cfg: MMDiTConfig, abstract: bool = False) -> dict:
    """Random prompt embeddings at the config's shapes (and `x0` for PeRFlow's start points)."""
    b, dtype = int(config.train.batch_size), jnp.dtype(config.model.dtype)
    seq = CLIP_TOKENS + int(config.data.max_sequence_length)
    shapes = {
        "prompt_embeds": (b, seq, cfg.joint_attention_dim),
        "pooled": (b, cfg.pooled_projection_dim),
        "negative_prompt_embeds": (b, seq, cfg.joint_attention_dim),
        "negative_pooled": (b, cfg.pooled_projection_dim),
    }
    if config.distill.start_points == "interpolate":
        shapes["x0"] = (b, *config.model.latent_shape)
    if abstract:
        return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
    keys = jax.random.split(jax.random.key(1), len(shapes))
    return {k: jax.random.normal(r, s, dtype) for r, (k, s) in zip(keys, shapes.items(), strict=True)}


def _train_flops(config, cfg: MMDiTConfig, mesh) -> float:
    """Matmul FLOPs of the step traced abstractly with XLA attention (as `benchmarks/chip_budget.py`)."""
    from flowsteer_jax.distill import abstract_train_state, make_step, model_options

    config = config.copy_and_resolve_references()
    config.model.attention = "xla"
    build = lambda: MMDiT(cfg, rngs=nnx.Rngs(0), **{**model_options(config), "implementation": "xla"})  # noqa: E731
    state, frozen, graphs = abstract_train_state(config, build, mesh=mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    traced = make_step(config, graphs).trace(state, frozen, _train_batch(config, cfg, abstract=True), key)
    return chips.matmul_flops(traced.jaxpr)


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


def part_train(report: Report, sizes: Sizes, config, out: dict) -> None:
    from flowsteer_jax import parallel
    from flowsteer_jax.distill import make_step, make_train_state, model_options, place_batch

    cfg = sizes.train_mmdit or TRANSFORMERS[config.model.preset]
    b, mesh = int(config.train.batch_size), parallel.mesh_from_config(config)
    out.update(
        model="small" if sizes.train_mmdit else config.model.preset,
        layers=cfg.num_layers,
        batch=b,
        latent_shape=list(config.model.latent_shape),
        tokens=CLIP_TOKENS + int(config.data.max_sequence_length),
        remat_policy=config.model.remat_policy or "none",
        teacher_steps=int(config.distill.teacher_steps),
        disc_blocks=int(config.disc.num_blocks),
        attention=config.model.attention or "auto",
    )
    base = _random_module(lambda: MMDiT(cfg, rngs=nnx.Rngs(config.seed), **model_options(config)))
    state, frozen, graphs = make_train_state(config, base, mesh=mesh)
    del base
    batch, key = place_batch(_train_batch(config, cfg), graphs), jax.random.PRNGKey(config.seed)
    t0 = time.perf_counter()
    lowered = make_step(config, graphs).lower(state, frozen, batch, key)
    lower_s = time.perf_counter() - t0
    # Tracing the FLOP twin is Python work, XLA's compile runs with the GIL released: overlap the two.
    with ThreadPoolExecutor(1) as pool:
        flops_future = pool.submit(_train_flops, config, cfg, mesh)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        flops = flops_future.result()
    out.update(
        lower_s=lower_s,
        compile_s=compile_s,
        tflop_per_step=flops / 1e12,
        predicted_gib=_predicted_gib(compiled),
        flash_attention=any("fmha" in k for k in chips.custom_calls(compiled)),
    )
    report.line(
        "3 train compile",
        f"{out['model']} ({cfg.num_layers} layers), batch {b}, latents {tuple(config.model.latent_shape)}, "
        f"{out['tokens']} tokens, remat {out['remat_policy']}, {out['teacher_steps']} teacher steps, "
        f"{out['disc_blocks']} disc blocks: trace+lower {lower_s:.0f} s, compile {compile_s:.0f} s, XLA predicts "
        f"{_gib(out['predicted_gib'])}/device, cuDNN flash attention: {out['flash_attention']}",
    )
    out["peak_gib_before_steps"] = _peak_gib()  # the process's peak so far: the earlier parts' share
    times, metrics = [], {}
    for i in range(4):  # a warm-up, then up to 3 timed steps while the budget lasts
        if i >= 2 and report.time_left() < 2 * times[-1] + 30:
            break
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    out.update(
        step_s=step_s,
        timed_steps=len(times) - 1,
        first_step_s=times[0],
        windows_per_s=int(config.distill.num_segments) * b / step_s,
        peak_gib=_peak_gib(),
        loss=float(metrics["loss"]),
        finite=bool(metrics["finite"]),
    )
    report.line(
        "3 train step",
        f"{step_s:.2f} s/step (median of {out['timed_steps']}; first {times[0]:.1f} s), "
        f"{out['windows_per_s']:.3g} windows/s, device peak {_gib(out['peak_gib'])} (predicted "
        f"{_gib(out['predicted_gib'])}; before the steps {_gib(out['peak_gib_before_steps'])}), loss "
        f"{out['loss']:.3g}{'' if out['finite'] else ' NON-FINITE'}",
    )
    out["mfu"] = flops / (step_s * PEAK_BF16_FLOPS)
    report.line(
        "3 train MFU",
        f"{out['tflop_per_step']:.3g} TFLOP/step (matmuls, remat recomputation included): MFU {out['mfu']:.1%} of "
        f"{PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16",
    )


# --- 4. sampling ---


def _sampling_inputs(sizes: Sizes) -> dict[str, np.ndarray]:
    """Host noise (NCHW) and prompt embeddings, shared by both pipelines."""
    cfg, b, r = sizes.mmdit, sizes.sample_batch, np.random.default_rng(2)
    n = sizes.image_px // 2 ** (len(sizes.vae.block_out_channels) - 1)
    return {
        "latents": r.standard_normal((b, cfg.in_channels, n, n), dtype=np.float32),
        "prompt_embeds": r.standard_normal((b, sizes.tokens, cfg.joint_attention_dim), dtype=np.float32),
        "pooled": r.standard_normal((b, cfg.pooled_projection_dim), dtype=np.float32),
    }


def _ours_sampling(sizes: Sizes, inputs: dict[str, np.ndarray]) -> dict:
    """`SD3Pipeline`'s jitted Euler loop + VAE decode, images copied to the host as diffusers' "np" output."""
    from flowsteer_jax.flow.schedules import sigmas as make_sigmas
    from flowsteer_jax.pipeline import _denoise_decode

    t_graph, t_state = nnx.split(_mmdit(sizes.mmdit))
    vae = _random_module(lambda: AutoencoderKL(sizes.vae, rngs=nnx.Rngs(1), dtype=jnp.bfloat16))
    v_graph, v_state = nnx.split(vae)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
    sigmas = jnp.asarray(make_sigmas(STEPS, "diffusers", 3.0))
    cond = {"prompt_embeds": bf16["prompt_embeds"], "pooled": bf16["pooled"]}

    def run() -> np.ndarray:
        _, images = _denoise_decode(
            t_graph,
            t_state,
            v_graph,
            v_state,
            bf16["latents"],
            sigmas,
            cond,
            None,  # no CFG: the distilled student
            jnp.float32(0.0),
            cfg=False,
            decode=True,
            num_train_timesteps=1000,
        )
        return np.asarray(images)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    seconds = _median_s(run, sizes.sample_repeats, warmup=0)
    return {"s": seconds, "compile_s": first - seconds}


def _diffusers_pipeline(sizes: Sizes):
    """`StableDiffusion3Pipeline` from random components (no text encoders: embeddings are given), bf16."""
    import diffusers

    with torch.device(TORCH_DEVICE):
        vae = diffusers.AutoencoderKL(**_diffusers_kwargs(sizes.vae.to_diffusers())).to(torch.bfloat16).eval()
    encoders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_torch_mmdit(sizes.mmdit),
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        **dict.fromkeys(encoders),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_sampling(sizes: Sizes, inputs: dict[str, np.ndarray], compile_transformer: bool) -> dict:
    pipe = _diffusers_pipeline(sizes)
    if compile_transformer:
        pipe.transformer = torch.compile(pipe.transformer)
    dev = {k: torch.from_numpy(v).to(TORCH_DEVICE, torch.bfloat16) for k, v in inputs.items()}

    def run() -> None:
        with torch.inference_mode():
            pipe(
                prompt_embeds=dev["prompt_embeds"],
                pooled_prompt_embeds=dev["pooled"],
                latents=dev["latents"],
                guidance_scale=0.0,
                num_inference_steps=STEPS,
                height=sizes.image_px,
                width=sizes.image_px,
                output_type="np",
            )
        _sync_torch()

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    seconds = _median_s(run, sizes.sample_repeats, warmup=0)
    return {"s": seconds, "compile_s": first - seconds}


def part_sampling(report: Report, sizes: Sizes, config, out: dict) -> None:
    b, px = sizes.sample_batch, sizes.image_px
    inputs = _sampling_inputs(sizes)
    ours = _ours_sampling(sizes, inputs)
    out.update(
        batch=b, image_px=px, ours_s=ours["s"], ours_images_per_s=b / ours["s"], ours_compile_s=ours["compile_s"]
    )
    report.line(
        "4 sampling ours",
        f"{STEPS} steps + VAE decode, batch {b}, {px}x{px}, no CFG: {out['ours_images_per_s']:.3g} images/s "
        f"({ours['s']:.2f} s/batch, compile {ours['compile_s']:.0f} s)",
    )
    _free()
    eager = _diffusers_sampling(sizes, inputs, compile_transformer=False)
    out.update(
        diffusers_s=eager["s"],
        diffusers_images_per_s=b / eager["s"],
        ratio_ours_over_diffusers_time=ours["s"] / eager["s"],
    )
    report.line(
        "4 sampling diffusers",
        f"eager: {out['diffusers_images_per_s']:.3g} images/s ({eager['s']:.2f} s/batch); ours/diffusers time "
        f"{out['ratio_ours_over_diffusers_time']:.3g}x",
    )


def part_sampling_compiled(report: Report, sizes: Sizes, config, out: dict, budget_s: float) -> None:
    """diffusers with `torch.compile` on its transformer: last, and only while `budget_s` are left (its compile
    cannot be interrupted)."""
    if report.time_left() < budget_s:
        reason = f"{report.time_left():.0f} s left < --torch_compile_budget_s={budget_s:.0f}"
        report.skipped["sampling_compiled"] = reason
        report.line("4 sampling diffusers torch.compile", f"skipped: {reason}")
        return
    b = sizes.sample_batch
    res = _diffusers_sampling(sizes, _sampling_inputs(sizes), compile_transformer=True)
    out.update(s=res["s"], images_per_s=b / res["s"], compile_s=res["compile_s"])
    text = f"{out['images_per_s']:.3g} images/s ({res['s']:.2f} s/batch, compile {res['compile_s']:.0f} s)"
    ours_s = report.results.get("sampling", {}).get("ours_s")
    if ours_s:
        out["ratio_ours_over_compiled_time"] = ours_s / res["s"]
        text += f"; ours/diffusers-compiled time {out['ratio_ours_over_compiled_time']:.3g}x"
    report.line("4 sampling diffusers torch.compile", text)


# --- main ---


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("small", False, "toy sizes everywhere (a CPU run of the plumbing)", flag_values=fv)
    flags.DEFINE_string("config", DEFAULT_CONFIG, "train config file", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "train config override KEY=VALUE, repeatable", flag_values=fv)
    flags.DEFINE_string("parts", ",".join(PARTS), f"comma-separated, of {PARTS}", flag_values=fv)
    flags.DEFINE_float("budget_s", 455.0, "print the results and exit after this long", flag_values=fv)
    help_ = "run diffusers + torch.compile only with this left"
    flags.DEFINE_float("torch_compile_budget_s", 150.0, help_, flag_values=fv)
    flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache folder (faster reruns)", flag_values=fv)


def parse_args(argv: list[str] | None = None):
    args = cli.parse(define_flags, argv, prog="benchmarks.device_check", doc=__doc__)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        cli.fail("benchmarks.device_check", f"--parts: unknown {unknown}; of {PARTS}")
    return args


def _quiet_progress_bars() -> None:
    """Loading/saving progress bars would bury the result lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _devices() -> dict[str, str]:
    torch_name = torch.cuda.get_device_name() if TORCH_DEVICE == "cuda" else "cpu"
    return {
        "jax_device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "torch_device": f"{TORCH_DEVICE}: {torch_name}",
        "jax": jax.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(start=time.perf_counter(), budget_s=args.budget_s)
    _start_watchdog(report)
    _quiet_progress_bars()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    try:  # a bad --config/--set fails before any work
        config, config_text = load_config(args.config, args.set, args.small)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        print(f"device_check: bad --config/--set: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    sizes = SMALL if args.small else FULL
    report.results.update(_devices(), small=args.small, train_config=config_text)
    report.line("devices", f"JAX {report.results['jax_device']} | torch {report.results['torch_device']}")
    parts: dict[str, Callable[..., None]] = {
        "parity_mmdit": part_parity_mmdit,
        "parity_pipeline": part_parity_pipeline,
        "forward": part_forward,
        "sampling": part_sampling,
        "train": part_train,
        "sampling_compiled": lambda *a: part_sampling_compiled(*a, budget_s=args.torch_compile_budget_s),
    }
    for name in (p for p in PARTS if p in args.parts):
        print(f"=== {name} ({report.time_left():.0f} s left) ===", flush=True)
        report.running = name
        t0 = time.perf_counter()
        out = report.results[name] = {}  # filled as the part goes: a late failure keeps the earlier numbers
        try:
            parts[name](report, sizes, config, out)
        except Exception as e:  # one part's failure must not cost the others' numbers
            traceback.print_exc()
            report.failed[name] = f"{type(e).__name__}: {e}"[:1000]
        report.results.setdefault("part_s", {})[name] = time.perf_counter() - t0
        if not out:
            del report.results[name]
        report.running = None
        _free()
    with report.lock:  # the watchdog must not print a second summary
        report.done = True
        print(report.summary(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
