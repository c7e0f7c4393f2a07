"""The XLA:CPU inference flags: who gets them, and that they reach XLA when set before the first computation."""

import os
import subprocess
import sys

from flowsteer_jax.xla_cpu import INFERENCE_FLAGS, use_inference_flags


def test_cpu_only_process_gets_every_flag():
    env = {"JAX_PLATFORMS": "cpu"}
    assert use_inference_flags(env) == list(INFERENCE_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(INFERENCE_FLAGS)
    assert use_inference_flags(env) == []  # idempotent


def test_flags_the_user_set_are_kept():
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_disable_hlo_passes=foo --xla_force_host_platform_device_count=8"}
    assert use_inference_flags(env) == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert env["XLA_FLAGS"].startswith("--xla_disable_hlo_passes=foo --xla_force_host_platform_device_count=8 ")


def test_nothing_added_where_an_accelerator_may_run():
    for platforms in ("cuda", "tpu", "cuda,cpu"):
        env = {"JAX_PLATFORMS": platforms}
        assert use_inference_flags(env) == [] and "XLA_FLAGS" not in env


def test_flags_take_effect_in_a_fresh_process():
    """LayerNorm's 128-wide row sums: XLA:CPU's default rewrites them into reduce-windows; with the flags, not."""
    code = (
        "import sys; from flowsteer_jax.xla_cpu import use_inference_flags\n"
        "if sys.argv[1] == 'on': use_inference_flags()\n"
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((8, 128))\n"
        "hlo = jax.jit(lambda x: x - x.mean(-1, keepdims=True)).lower(x).compile().as_text()\n"
        "print('reduce-window' in hlo)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert run("off") == "True"  # else this test no longer shows anything: XLA changed its default
    assert run("on") == "False"
