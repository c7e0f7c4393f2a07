"""Train-step benchmark: OTA vs PeRFlow start points, and the memory XLA predicts for SD3-Medium at 1024².

    python benchmarks/train_step.py                    # both parts (memory part also on 8 fake devices)
    python benchmarks/train_step.py throughput [--layers 4 --width 128 --latent 32 --batch 4 --steps 3]
    python benchmarks/train_step.py memory [--devices 8] [--remat full]

`throughput`: one run, one config, `distill.start_points` "ota" then "interpolate" (PeRFlow, `x0` from the
batch): compile time apart, steps/s and trained windows/s (K windows per prompt both ways), and the peak
memory of each compiled step (XLA's `memory_analysis`: arguments + temporaries + outputs - aliased; the
device's own `peak_bytes_in_use` where the backend reports it). Both modes run the same teacher NFE
(`teacher_steps` Euler steps with CFG per prompt): OTA in one trajectory, PeRFlow as K batched window solves.

`memory`: SD3-Medium-shaped random weights built with `jax.eval_shape` (nothing allocated), bf16 base and
discriminator, fp32 LoRA (rank 64) and Adam moments; `lower(...).compile().memory_analysis()` of the whole
step at 1024² (latent 128x128x16), 1 prompt per device; on N devices with FSDP (mesh (1, N, 1)).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import flags

from flowsteer_jax import chips, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("all", "throughput", "memory")

GiB = 2**30


def _batch(b, seq, joint, pooled, latent, dtype, rng):
    import jax.numpy as jnp

    arrays = dict(
        prompt_embeds=rng.standard_normal((b, seq, joint)),
        pooled=rng.standard_normal((b, pooled)),
        negative_prompt_embeds=rng.standard_normal((b, seq, joint)),
        negative_pooled=rng.standard_normal((b, pooled)),
        x0=rng.standard_normal((b, *latent)),
    )
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


def throughput(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from flowsteer_jax.distill import default_config, make_step, make_train_state, place_batch
    from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig

    heads = max(args.width // 32, 1)
    cfg = MMDiTConfig(
        sample_size=args.latent,
        patch_size=2,
        in_channels=16,
        num_layers=args.layers,
        attention_head_dim=args.width // heads,
        num_attention_heads=heads,
        joint_attention_dim=64,
        caption_projection_dim=args.width,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=args.latent // 2,
    )
    latent = (args.latent, args.latent, 16)
    batch_host = _batch(args.batch, 16, 64, 32, latent, np.float32, np.random.default_rng(0))
    results = {}
    for mode in args.modes.split(","):
        config = default_config()
        config.model.latent_shape = latent
        config.model.remat_policy = args.remat
        config.lora.rank, config.lora.alpha = 16, 16.0
        config.disc.num_blocks = max(args.layers // 2, 1)
        config.distill.teacher_steps = args.teacher_steps
        config.distill.start_points = mode
        config.mesh.shape = (-1, 1, 1)
        state, frozen, graphs = make_train_state(config, MMDiT(cfg, rngs=nnx.Rngs(0), remat_policy=args.remat or None))
        batch, rng = place_batch(batch_host, graphs), jax.random.PRNGKey(0)
        step = make_step(config, graphs)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, frozen, batch, rng)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, frozen, batch, rng)
        jax.block_until_ready(metrics)
        dt = (time.perf_counter() - t0) / args.steps
        stats = jax.devices()[0].memory_stats() or {}
        results[mode] = {
            "compile_s": compile_s,
            "step_s": dt,
            "steps_per_s": 1 / dt,
            "windows_per_s": float(metrics["windows"]) / dt,
            "loss": float(metrics["loss"]),
            "xla_memory": chips.memory_gib(compiled),
            "device_peak_gib": stats.get("peak_bytes_in_use", 0) / GiB or None,
        }
    if {"ota", "interpolate"} <= set(results):
        results["ota_vs_perflow_windows_per_s"] = (
            results["ota"]["windows_per_s"] / results["interpolate"]["windows_per_s"]
        )
    results["setup"] = {
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "model": f"{args.layers} layers, width {args.width}, latent {latent}",
        "batch": args.batch,
        "windows": 4,
        "teacher_steps": args.teacher_steps,
        "remat": args.remat,
    }
    return results


def memory(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowsteer_jax.distill import abstract_train_state, default_config, make_step
    from flowsteer_jax.models.mmdit import MMDiT
    from flowsteer_jax.models.presets import TRANSFORMERS
    from flowsteer_jax.parallel import make_mesh

    n = len(jax.devices())
    config = default_config()
    config.model.remat_policy = args.remat
    config.model.latent_shape = (128, 128, 16)
    config.mesh.shape = (1, n, 1)
    sd3_medium = TRANSFORMERS["sd3_medium"]
    layers = args.sd3_layers or sd3_medium.num_layers
    # Fewer layers keep SD3-Medium's width and the discriminator's share (12 of 24 blocks): compile two depths
    # and extrapolate linearly in depth when the full model does not compile on the machine at hand.
    config.disc.num_blocks = max(1, layers // 2)
    cfg = dataclasses.replace(sd3_medium, num_layers=layers)
    mesh = make_mesh(config.mesh.shape)
    t0 = time.perf_counter()
    state, frozen, graphs = abstract_train_state(
        config, lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat_policy=args.remat or None), mesh=mesh
    )
    b = n * args.per_device_batch
    sds = jax.ShapeDtypeStruct
    batch = {
        "prompt_embeds": sds((b, 333, 4096), jnp.bfloat16),
        "pooled": sds((b, 2048), jnp.bfloat16),
        "negative_prompt_embeds": sds((b, 333, 4096), jnp.bfloat16),
        "negative_pooled": sds((b, 2048), jnp.bfloat16),
    }
    lowered = make_step(config, graphs).lower(state, frozen, batch, sds((2,), jnp.uint32))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    def count(tree):
        return sum(x.size for x in jax.tree.leaves(tree))

    return {
        "devices": n,
        "layers": layers,
        "disc_blocks": int(config.disc.num_blocks),
        "mesh": tuple(config.mesh.shape),
        "global_batch": b,
        "remat": args.remat,
        "params": {
            "base": count(frozen["base"]),
            "lora": count(state["params"]["lora"]),
            "disc": count(state["params"]["disc"]),
        },
        "per_device": chips.memory_gib(compiled),
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
    }


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("layers", 4, "throughput: transformer layers", flag_values=fv)
    flags.DEFINE_integer("width", 128, "throughput: transformer width", flag_values=fv)
    flags.DEFINE_integer("latent", 32, "throughput: latent side", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "throughput: prompts per step", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "throughput: timed steps", flag_values=fv)
    flags.DEFINE_integer("teacher-steps", 28, "teacher Euler steps per prompt", flag_values=fv)
    flags.DEFINE_string("remat", None, "model.remat_policy", flag_values=fv)
    flags.DEFINE_string("modes", "ota,interpolate", "throughput: start-point modes, in run order", flag_values=fv)
    flags.DEFINE_integer("devices", 1, "memory part: fake CPU devices (subprocess)", flag_values=fv)
    flags.DEFINE_integer("per-device-batch", 1, "memory part: prompts per device", flag_values=fv)
    flags.DEFINE_integer("sd3-layers", 0, "memory part: SD3-Medium with this many layers", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    prog = "benchmarks.train_step"
    args = cli.parse(define_flags, argv, prog=prog, doc=__doc__, positional=True)
    if len(args.positional) > 1 or (args.positional and args.positional[0] not in PARTS):
        cli.fail(prog, f"expected at most one part, of {PARTS}; got {args.positional}")
    args.part = args.positional[0] if args.positional else "all"

    if (
        args.part in ("memory", "all")
        and args.devices > 1
        and "xla_force_host_platform_device_count" not in (os.environ.get("XLA_FLAGS", ""))
    ):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "benchmarks.train_step", "memory", f"--remat={args.remat}"]
        cmd += [f"--per-device-batch={args.per_device_batch}", f"--sd3-layers={args.sd3_layers}"]
        out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1])
        if args.part == "memory":
            return
        args.devices = 1
    if args.remat in ("None", "none"):
        args.remat = None
    parts = ("throughput", "memory") if args.part == "all" else (args.part,)
    for part in parts:
        result = throughput(args) if part == "throughput" else memory(args)
        print(json.dumps({part: result}, default=float))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
