"""XLA:CPU flags for inference: the sampling CLI and the forward/sampling benchmarks use them.

The MMDiT forward and 4-step sampling run faster with both (measured side by side by benchmarks/mmdit_forward.py
and benchmarks/sampling.py; numbers in the README). A training step does not profit (XLA's YNNPACK dots handle
the backward's transposed products better), so `flowsteer_jax.train` keeps XLA's defaults.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import MutableMapping

INFERENCE_FLAGS = (
    # YNNPACK dot fusions lose to XLA's Eigen dots on the forward's GEMM shapes.
    "--xla_cpu_experimental_ynn_fusion_type=",
    # The tree-reduction rewrite turns every LayerNorm / softmax row sum into an unfused reduce-window; XLA:CPU's
    # own reduction loops are as accurate on our sizes (checked on 4M-element sums).
    "--xla_disable_hlo_passes=tree_reduction_rewriter",
)


def accelerator_possible(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX may pick a GPU/TPU in this process (a plugin is installed and JAX_PLATFORMS allows it)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",") != ["cpu"]
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"))


def use_inference_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Adds INFERENCE_FLAGS to XLA_FLAGS in a CPU-only process; returns the flags added.

    Must run before JAX creates its backends (the first computation). A flag the user already set in XLA_FLAGS
    is left as it is; nothing is added where an accelerator may be used, as the second flag is not CPU-only.
    """
    if accelerator_possible(environ):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in INFERENCE_FLAGS if f.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
