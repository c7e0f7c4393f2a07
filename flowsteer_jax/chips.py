"""Compile-only chip targets: device meshes for GPUs and TPUs this machine does not have.

XLA's GPU and TPU compilers run on a CPU host in compile-only mode: a program lowered over these devices
compiles for the named chip, and the compiled executable's `memory_analysis()` / `cost_analysis()` are the
chip's per-device memory and FLOPs. Nothing can execute. Needs `requirements-aot.txt` (libtpu and the CUDA
plugin) and, for GPUs without a driver, `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` before jax starts (`enable()`).

GPU targets are `stream_executor.GpuTargetConfigProto`s written from the chips' published specs (the same
fields as XLA's own H100 spec file); TPU targets are libtpu's topologies. `peak_bf16_tflops` is the dense
bf16 rate of the datasheet, for FLOP-bound lower limits on step time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "cuda" | "tpu"
    description: str
    memory_bytes: int  # what one device can hold
    peak_bf16_tflops: float
    memory_bandwidth: float = 0.0  # bytes/s (GPU target config)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


CHIPS: dict[str, Chip] = {
    # device_memory_size: what the driver reports usable (H100 80GB HBM3 / H200 141GB HBM3e).
    "h100": Chip("h100", "cuda", "NVIDIA H100 80GB HBM3", 84_978_434_048, 989.0, 3_352_320_000_000),
    "h200": Chip("h200", "cuda", "NVIDIA H200", 150_754_820_096, 989.0, 4_800_000_000_000),
    # TPU HBM per chip and dense bf16 peak, from the Cloud TPU system-architecture pages.
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 16 * GiB, 197.0),
    "v5p": Chip("v5p", "tpu", "TPU v5", 95 * GiB, 459.0),
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 32 * GiB, 918.0),
}


def enable() -> None:
    """Set up a compile-only process. Must run before jax initialises its backends.

    The CUDA plugin's start-up check needs a driver; libtpu takes a machine-wide lock meant for the one process
    that drives the chips, and here there are no chips to share (tests and benchmarks compile side by side).
    """
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets need no runtime backend but the host


def gpu_target_config(chip: Chip) -> str:
    """A `GpuTargetConfigProto` in protobuf text format for a Hopper (sm_90) GPU."""
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.memory_bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {chip.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{chip.description}"
"""


def tpu_topology_name(chip: Chip, n: int) -> str:
    """libtpu topology for `n` chips: 2-D tori for v5e/v6e (1x1 ... 16x16), 3-D for v5p (2x2x1, 2x2x2, ...)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"--devices={n}: TPU slices here are powers of two")
    if chip.name == "v5p":  # 3-D torus: grow the axes in turn (2x2x1, 2x2x2, 2x2x4, 2x4x4, ...)
        dims = [1, 1, 1]
        for i in range(int(math.log2(n))):
            dims[i % 3] *= 2
        dims = sorted(dims) if n >= 8 else sorted(dims, reverse=True)
        return "v5p:" + "x".join(map(str, dims))
    a = 2 ** (int(math.log2(n)) // 2)
    return f"{chip.name}:{a}x{n // a}"


def chip_devices(name: str, n: int) -> list:
    """`n` compile-only devices of chip `name` (see `CHIPS`)."""
    from jax.experimental import topologies

    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; one of {sorted(CHIPS)}")
    chip = CHIPS[name]
    if chip.platform == "tpu":
        topo = topologies.get_topology_desc(topology_name=tpu_topology_name(chip, n), platform="tpu")
    else:
        enable()
        topo = topologies.get_topology_desc(
            topology_name="", platform="cuda", target_config=gpu_target_config(chip), topology=f"1x1x{n}"
        )
    devices = list(topo.devices)
    if len(devices) != n:
        raise ValueError(f"{name}: asked for {n} devices, the topology has {len(devices)}")
    return devices


def chip_mesh(name: str, n: int, shape: Sequence[int] = (-1, 1, 1)):
    """A ('data', 'fsdp', 'tensor') mesh over `n` compile-only devices of chip `name`."""
    from flowsteer_jax.parallel import make_mesh

    return make_mesh(shape, np.array(chip_devices(name, n)).tolist())


def matmul_flops(closed_jaxpr) -> float:
    """FLOPs of every `dot_general` and convolution a jaxpr executes, loops and recomputation included.

    XLA's `cost_analysis()` cannot serve: the GPU compile-only client returns none, and TPU's counts a loop
    body once (OTA's 28-step teacher scan would count as one step). Here a `scan` body counts `length` times,
    a `cond` its costliest branch, and the backward pass's rematerialised forward as written in the jaxpr.
    Elementwise work is left out (a few percent in a transformer); attention counts as its two products, so
    trace with `attention="xla"`: flash kernels are opaque custom calls with the same arithmetic.
    """
    from jax.extend import core

    def cost(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name, params = eqn.primitive.name, eqn.params
            if name == "dot_general":
                (contract, _), _ = params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            elif name == "conv_general_dilated":
                rhs, spec = eqn.invars[1].aval.shape, params["dimension_numbers"].rhs_spec
                per_output = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
            subs = [cost(j) for j in _sub_jaxprs(params, core)]
            if name == "cond":
                total += max(subs, default=0.0)
            elif name == "scan":
                total += params["length"] * sum(subs)
            else:
                total += sum(subs)
        return total

    return cost(closed_jaxpr.jaxpr)


def _sub_jaxprs(params: dict, core) -> list:
    found = []
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, core.Jaxpr):
                found.append(v)
    return found


def memory_gib(compiled) -> dict[str, float] | None:
    """XLA's per-device memory of a compiled program, in GiB: arguments, temporaries, outputs, aliased (donated
    outputs reusing argument buffers) and `total_gib` = arguments + temporaries + outputs - aliased. None when the
    backend reports no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {
        "arguments_gib": m.argument_size_in_bytes / GiB,
        "temporaries_gib": m.temp_size_in_bytes / GiB,
        "outputs_gib": m.output_size_in_bytes / GiB,
        "aliased_gib": m.alias_size_in_bytes / GiB,
    }
    out["total_gib"] = out["arguments_gib"] + out["temporaries_gib"] + out["outputs_gib"] - out["aliased_gib"]
    return out


def custom_calls(compiled) -> list[str]:
    """Custom-call targets of a compiled program: shows which attention kernel was really used."""
    import re

    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
