"""Compile-measured budgets on the chips a config is for: per-device memory, FLOPs, fits or not.

    python benchmarks/chip_budget.py --config=configs/sd3_medium.py --chip=h100 --devices=8 [--config.a.b=v ...]
    python benchmarks/chip_budget.py --config=configs/sd3_5_large.py --chip=v5p --devices=8 --parts=train

`--chip`: h100, h200 (XLA's GPU compiler, CUDA plugin) or v5e, v5p, v6e (libtpu); `--devices`: chips in the
mesh (the config's `mesh.shape`, one -1 filling). Builds the real train step of the config at real shapes
(abstract weights of `model.preset`'s architecture, `model.latent_shape`, 77 CLIP + `data.max_sequence_length`
T5 tokens, the config's batch, mesh, remat, discriminator, teacher steps, attention), lowers and compiles it
for that chip without the chip (`flowsteer_jax/chips.py`), and reports XLA's own per-device memory
(`memory_analysis`) and the step's matmul/conv FLOPs from its jaxpr (`chips.matmul_flops`: XLA's `cost_analysis`
is empty for the GPU target and counts a loop body once on TPU). A TPU compile refused for lack of HBM is reported
as "does not fit" with the temporaries the compiler asked for. Also (`--parts`) the 4-step student sampler, the
28-step CFG teacher sampler (one image per device) and the VAE decode at the latent size. Needs `requirements-aot.txt`.

Prints a table, then as the last stdout line one JSON object: `per_device_gib` (train step: arguments +
temporaries + outputs - aliased), `chip_gib`, `fits`, `tflops_per_step` (all devices), and the details.
`step_s_lower_bound` is the bf16 FLOP-bound limit: FLOPs / (devices x peak), not a measured time.
"""

from __future__ import annotations

import json
import re
import sys
import time
import types

from absl import app, flags
from ml_collections import config_flags

from flowsteer_jax import chips

PARTS = ("train", "student", "teacher", "vae")
GiB = 2**30


def define_flags() -> None:
    flags.DEFINE_enum("chip", None, sorted(chips.CHIPS), "chip to compile for")
    flags.DEFINE_integer("devices", 1, "chips in the mesh")
    flags.DEFINE_list("parts", ",".join(PARTS), f"what to compile, of {PARTS}")
    flags.DEFINE_integer("layers", 0, "override the preset's depth (quick trials; 0: the real depth)")
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)


class _Refused:
    """A program the TPU compiler refused for lack of HBM: what it said it needed stands in for the analysis."""

    def __init__(self, message: str, temporaries_gib: float):
        self.message, self.temporaries_gib = message, temporaries_gib

    def memory_analysis(self):
        zero = dict(argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0)
        return types.SimpleNamespace(temp_size_in_bytes=self.temporaries_gib * GiB, **zero)

    def as_text(self) -> str:
        return ""


def _compile(fn, *args, **kwargs) -> tuple[object, float]:
    import jax

    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except jax.errors.JaxRuntimeError as e:
        # "CompileTimeHbmOom: ... the total memory required for HLO temporaries (18.79G) exceeds available HBM":
        # a measured "does not fit" (temporaries alone; arguments come on top).
        need = re.search(r"CompileTimeHbmOom.*?HLO temporaries \(([\d.]+)G\)", str(e), re.DOTALL)
        if need is None:
            raise
        compiled = _Refused(str(e).splitlines()[0], float(need.group(1)))
    return compiled, time.perf_counter() - t0


def _abstract(tree, shardings):
    import jax

    # `shardings` is a prefix of `tree` (one sharding per NNX Variable): place every leaf under it.
    place = lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)  # noqa: E731
    return jax.tree.map(place, shardings, tree)


def _prompt_batch(b, seq, cfg, dtype, sharding):
    import jax

    sds = lambda *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    return {
        "prompt_embeds": sds(b, seq, cfg.joint_attention_dim),
        "pooled": sds(b, cfg.pooled_projection_dim),
        "negative_prompt_embeds": sds(b, seq, cfg.joint_attention_dim),
        "negative_pooled": sds(b, cfg.pooled_projection_dim),
    }


def _flops(fn, *args) -> float:
    """Matmul FLOPs of the whole (global) program, all devices together (`chips.matmul_flops`)."""
    import jax

    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    return chips.matmul_flops(fn.trace(*args).jaxpr)


def _flat(program: tuple) -> tuple:
    fn, args = program
    return (fn, *args)


def _train_program(config, cfg, mesh, attention) -> tuple:
    """(jitted step, abstract arguments); FLOPs are counted on an `attention="xla"` twin (same arithmetic)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowsteer_jax.distill import abstract_train_state, make_step, model_options
    from flowsteer_jax.models.mmdit import MMDiT
    from flowsteer_jax.models.presets import CLIP_TOKENS

    dtype = jnp.dtype(config.model.dtype)
    state, frozen, graphs = abstract_train_state(
        config,
        lambda: MMDiT(cfg, rngs=nnx.Rngs(0), **{**model_options(config), "implementation": attention}),
        mesh=mesh,
    )
    # Abstract leaves without shardings: `make_step`'s in_shardings place them.
    b = int(config.train.batch_size)
    batch = _prompt_batch(b, CLIP_TOKENS + int(config.data.max_sequence_length), cfg, dtype, None)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return make_step(config, graphs), (state, frozen, batch, key)


def train_budget(config, cfg, mesh) -> dict:
    import jax

    step, args = _train_program(config, cfg, mesh, config.model.attention or None)
    compiled, seconds = _compile(step, *args)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    state, frozen = args[:2]
    b = int(config.train.batch_size)
    return {
        "memory": chips.memory_gib(compiled),
        "kernels": chips.custom_calls(compiled),
        "refused": getattr(compiled, "message", None),
        "flops": _flops(*_flat(_train_program(config, cfg, mesh, "xla"))),
        "compile_s": seconds,
        "global_batch": b,
        "windows": int(config.distill.num_segments) * b,
        "params": {k: count(v) for k, v in {**state["params"], "base": frozen["base"]}.items()},
    }


def _sampler_program(config, cfg, mesh, steps: int, cfg_guidance: bool, attention):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowsteer_jax import parallel
    from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS
    from flowsteer_jax.models.mmdit import MMDiT
    from flowsteer_jax.models.presets import CLIP_TOKENS
    from flowsteer_jax.pipeline import _denoise_decode

    dtype, rules = jnp.dtype(config.model.dtype), parallel.rules_from_config(config)
    model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=attention))
    graph, state = nnx.split(model)
    state = _abstract(state, parallel.tree_shardings(state, mesh, rules))
    n = mesh.size
    h, w, c = tuple(config.model.latent_shape)
    rows = parallel.batch_sharding(mesh, rules)
    p = _prompt_batch(n, CLIP_TOKENS + int(config.data.max_sequence_length), cfg, dtype, rows)
    latents = jax.ShapeDtypeStruct((n, c, h, w), dtype, sharding=rows)
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=parallel.replicated(mesh))
    cond = {"prompt_embeds": p["prompt_embeds"], "pooled": p["pooled"]}
    uncond = {"prompt_embeds": p["negative_prompt_embeds"], "pooled": p["negative_pooled"]} if cfg_guidance else None
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
    kw = dict(cfg=cfg_guidance, decode=False, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    args = (state, latents, sigmas, cond, uncond, scalar)
    return lambda *a: _denoise_decode(graph, a[0], None, None, *a[1:], **kw), args


def sampler_budget(config, cfg, mesh, steps: int, cfg_guidance: bool) -> dict:
    """`SD3Pipeline`'s jitted Euler loop, one image per device, no decode."""
    import jax

    fn, args = _sampler_program(config, cfg, mesh, steps, cfg_guidance, config.model.attention or None)
    with jax.set_mesh(mesh):  # the attention kernel is chosen for the mesh's platform
        compiled, seconds = _compile(jax.jit(fn), *args)
        flops = _flops(*_flat(_sampler_program(config, cfg, mesh, steps, cfg_guidance, "xla")))
    return {
        "memory": chips.memory_gib(compiled),
        "kernels": chips.custom_calls(compiled),
        "flops": flops,
        "compile_s": seconds,
        "images": mesh.size,
    }


def vae_budget(config, mesh) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowsteer_jax import parallel
    from flowsteer_jax.models.presets import SD3_VAE
    from flowsteer_jax.models.vae import AutoencoderKL

    dtype, rules = jnp.dtype(config.model.dtype), parallel.rules_from_config(config)
    graph, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(SD3_VAE, rngs=nnx.Rngs(0), dtype=dtype)))
    state = _abstract(state, parallel.tree_shardings(state, mesh, rules))
    n = mesh.size
    latents = jax.ShapeDtypeStruct((n, *config.model.latent_shape), dtype, sharding=parallel.batch_sharding(mesh))
    decode = jax.jit(lambda s, z: nnx.merge(graph, s).decode_latents(z))
    with jax.set_mesh(mesh):
        compiled, seconds = _compile(decode, state, latents)
        flops = _flops(decode, state, latents)
    return {"memory": chips.memory_gib(compiled), "flops": flops, "compile_s": seconds, "images": n}


def budget(config, chip_name: str, devices: int, parts, layers: int = 0, transformer=None) -> dict:
    """The report for `config` on `devices` x `chip_name`; `transformer` (an MMDiTConfig) replaces the preset."""
    import dataclasses

    from conversion.errors import InputError
    from flowsteer_jax.models.presets import TRANSFORMERS

    if transformer is None and config.model.preset not in TRANSFORMERS:
        raise InputError(f"model.preset={config.model.preset!r}: set one of {sorted(TRANSFORMERS)}")
    cfg = transformer or TRANSFORMERS[config.model.preset]
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers)
        config.disc.num_blocks = min(int(config.disc.num_blocks), layers)
    chip = chips.CHIPS[chip_name]
    mesh = chips.chip_mesh(chip_name, devices, tuple(config.mesh.shape))
    out = {
        "chip": chip_name,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "chip_gib": chip.memory_gib,
        "preset": config.model.preset or "custom",
        "layers": cfg.num_layers,
        "attention": config.model.attention or "auto",
        "remat": config.model.remat_policy or "none",
        "disc_blocks": int(config.disc.num_blocks),
        "teacher_steps": int(config.distill.teacher_steps),
    }
    if "train" in parts:
        out["train"] = train_budget(config, cfg, mesh)
        t = out["train"]
        out["per_device_gib"] = t["memory"]["total_gib"]
        out["fits"] = bool(t["memory"]["total_gib"] <= chip.memory_gib)
        out["tflops_per_step"] = t["flops"] / 1e12
        out["tflops_per_window"] = out["tflops_per_step"] / t["windows"]
        out["step_s_lower_bound"] = out["tflops_per_step"] / (devices * chip.peak_bf16_tflops)
    if "student" in parts:
        out["student_4step"] = sampler_budget(config, cfg, mesh, int(config.distill.num_segments), False)
    if "teacher" in parts:
        out["teacher_28step_cfg"] = sampler_budget(config, cfg, mesh, 28, True)
    if "vae" in parts:
        out["vae_decode"] = vae_budget(config, mesh)
    for name in ("student_4step", "teacher_28step_cfg", "vae_decode"):
        if name in out:
            r = out[name]
            r["tflops_per_image"] = r["flops"] / r["images"] / 1e12
            r["fits"] = bool(r["memory"]["total_gib"] <= chip.memory_gib)
    return out


def table(result: dict) -> str:
    rows = [
        f"{result['preset']} ({result['layers']} layers) on {result['devices']}x {result['chip']} "
        f"(mesh {result['mesh']}, {result['chip_gib']:.1f} GiB each), attention {result['attention']}, "
        f"remat {result['remat']}",
        "| program | args GiB | temps GiB | outputs GiB | total GiB/device | fits | TFLOP | compile s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name in ("train", "student_4step", "teacher_28step_cfg", "vae_decode"):
        if name not in result:
            continue
        r, m = result[name], result[name]["memory"]
        fits = result["fits"] if name == "train" else r["fits"]
        tflop = f"{result['tflops_per_step']:.1f}/step" if name == "train" else f"{r['tflops_per_image']:.2f}/image"
        rows.append(
            f"| {name} | {m['arguments_gib']:.2f} | {m['temporaries_gib']:.2f} | {m['outputs_gib']:.2f} | "
            f"{m['total_gib']:.2f} | {'yes' if fits else 'NO'} | {tflop} | {r['compile_s']:.0f} |"
        )
    if "train" in result:
        rows.append(
            f"train step: {result['train']['windows']} windows, {result['tflops_per_window']:.2f} TFLOP/window, "
            f">= {result['step_s_lower_bound']:.2f} s/step at bf16 peak"
        )
    return "\n".join(rows)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.config is None or f.chip is None:
        raise app.UsageError("--config=configs/<name>.py and --chip are required")
    unknown = set(f.parts) - set(PARTS)
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; of {PARTS}")
    from flowsteer_jax import cli
    from flowsteer_jax.distill.config import validate

    try:
        validate(f.config)
        result = budget(f.config, f.chip, f.devices, f.parts, f.layers)
    except cli.INPUT_ERRORS as e:  # a bad config value: one line, exit code 2 (as the trainer)
        sys.exit(cli.error("benchmarks.chip_budget", e))
    print(table(result))
    print(json.dumps(result, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    chips.enable()
    define_flags()
    from flowsteer_jax.train import _parse_flags  # the train CLI's one-line errors for bad --config. flags

    app.run(main, flags_parser=_parse_flags)
