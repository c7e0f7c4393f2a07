"""`parallel`: logical names -> shardings, and `constrain` pinning activations only inside a traced program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flowsteer_jax import chips, parallel

X = jax.ShapeDtypeStruct((16, 3, 8), jnp.float32)


def _constraints(fn) -> list[str]:
    text = jax.jit(fn).lower(X).as_text()
    return [line.split("<@mesh, ")[1].split(">")[0] for line in text.splitlines() if "sharding_constraint" in line]


def _double(x):
    return parallel.constrain(x * 2, ("batch", None, "mlp"))


def test_logical_to_spec_drops_axes_that_do_not_divide():
    mesh = chips.chip_mesh("h100", 8, (2, 4, 1))
    spec = parallel.logical_to_spec(("batch", "embed", "mlp"), (16, 8, 3), mesh)
    # batch -> (data, fsdp); embed's fsdp is taken already; mlp's tensor axis has size 1
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    assert parallel.logical_to_spec(("batch",), (6,), mesh) == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="do not match"):
        parallel.logical_to_spec(("batch",), (6, 2), mesh)


def test_constrain_resolves_through_the_active_rules_and_mesh():
    mesh = chips.chip_mesh("h100", 8, (2, 4, 1))
    assert _constraints(parallel.traced_on(mesh, _double, parallel.DEFAULT_RULES)) == ['[{"data", "fsdp"}, {}, {}]']
    rules = {**parallel.DEFAULT_RULES, "batch": "fsdp"}
    assert _constraints(parallel.traced_on(mesh, _double, rules)) == ['[{"fsdp"}, {}, {}]']


def test_constrain_is_a_no_op_outside_a_traced_program():
    assert _constraints(_double) == []  # no mesh, no rules
    mesh = chips.chip_mesh("h100", 8, (2, 4, 1))
    assert _constraints(parallel.traced_on(mesh, _double)) == []  # a mesh but no rules
    one = chips.chip_mesh("h100", 1)
    assert _constraints(parallel.traced_on(one, _double, parallel.DEFAULT_RULES)) == []
