"""CI guard for the chips we do not have: the tiny model's train step and 4-step sampler compile for one H100
(cuDNN flash attention) and a TPU v5e 2x2 slice (splash attention) with XLA's real GPU/TPU compilers in
compile-only mode (`flowsteer_jax/chips.py`, `benchmarks/chip_budget.py`); the FLOP counter behind the
budgets counts loops and rematerialisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.chip_budget import budget
from flowsteer_jax import chips
from tests.test_distill import TINY, tiny_config

# What each chip's default attention compiles to: cuDNN's fused attention, the Pallas (Mosaic) TPU kernel.
KERNELS = {"h100": "__cudnn$fmha", "v5e": "tpu_custom_call"}


@pytest.mark.parametrize("chip,devices,mesh", [("h100", 1, (1, 1, 1)), ("v5e", 4, (1, 4, 1))])
def test_tiny_train_step_and_sampler_compile_for_the_chip(chip, devices, mesh):
    config = tiny_config()
    config.model.dtype = "bfloat16"  # cuDNN's flash kernels take bf16/fp16
    config.model.remat_policy = "dots"
    config.mesh.shape = mesh
    config.train.batch_size = 2 * devices
    # conftest's process-wide "highest" matmul precision would ask Mosaic for fp32 products of bf16 operands
    # inside the splash kernel, which it cannot lower; training on a TPU runs at the default precision.
    with jax.default_matmul_precision("default"):
        report = budget(config, chip, devices, ("train", "student"), transformer=TINY)
    assert report["attention"] == "auto"
    for part in ("train", "student_4step"):
        kernels = report[part]["kernels"]
        assert any(k.startswith(KERNELS[chip]) for k in kernels), (part, kernels)
        assert report[part]["memory"]["total_gib"] > 0
    assert report["fits"] and report["tflops_per_step"] > 0


def test_matmul_flops_counts_loops_and_remat():
    a, b = jnp.ones((16, 32)), jnp.ones((32, 32))
    one = 2 * 16 * 32 * 32

    def f(a, b):
        body = jax.checkpoint(lambda c, _: (jnp.tanh(c @ b), None))
        return jax.lax.scan(body, a, None, length=10)[0].sum()

    assert chips.matmul_flops(jax.make_jaxpr(f)(a, b)) == 10 * one
    # Backward: the rematerialised forward once more, and two products (d/da, d/db) per step.
    assert chips.matmul_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(a, b)) == 40 * one
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert chips.matmul_flops(jax.make_jaxpr(conv)(x, w)) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)


def test_tpu_topologies():
    names = {n: chips.tpu_topology_name(chips.CHIPS["v5p"], n) for n in (4, 8, 16)}
    assert names == {4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"}
    assert chips.tpu_topology_name(chips.CHIPS["v6e"], 8) == "v6e:2x4"
    with pytest.raises(ValueError, match="powers of two"):
        chips.tpu_topology_name(chips.CHIPS["v5e"], 6)


def test_fsdp_needs_no_more_temporaries_than_data_parallelism():
    """Per device, the same batch per device: FSDP over 4 GPUs vs pure data parallelism, on the GPU compiler.

    Before the student/discriminator batches were batch-major (and CFG rows interleaved), XLA moved activations
    between devices under sharding (collective-permutes of whole token batches). TPU is checked at SD3's width by
    `benchmarks/chip_budget.py` (README): at this tiny width the weights are smaller than the activations and
    XLA's TPU partitioner rightly trades differently.
    """
    chip = "h100"
    temps = {}
    for mesh in ((4, 1, 1), (1, 4, 1)):
        config = tiny_config()
        config.model.dtype = "bfloat16"
        config.mesh.shape = mesh
        config.train.batch_size = 8
        with jax.default_matmul_precision("default"):
            report = budget(config, chip, 4, ("train",), transformer=TINY)
        temps[mesh] = report["train"]["memory"]["temporaries_gib"]
    assert temps[(1, 4, 1)] <= 1.25 * temps[(4, 1, 1)], temps
