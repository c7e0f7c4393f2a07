"""Load and save diffusers-format model folders as NNX modules (weights converted by `conversion/`).

Loading builds the module abstractly (`nnx.eval_shape`, no allocation), then reads, converts, casts and places
one tensor at a time: with a mesh (argument or `jax.set_mesh`) each weight goes straight to its sharding, and a
bf16 checkpoint loaded as bf16 is never widened to fp32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from conversion import sd3_transformer
from conversion.safetensors_io import open_checkpoint, save_checkpoint
from conversion.table import Entry, check_checkpoint, to_torch_state
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig
from flowsteer_jax.parallel import DEFAULT_RULES, MeshAxes, current_mesh, variable_sharding


def _place(
    build: Callable[[], nnx.Module],
    folder: str,
    table: Iterable[Entry],
    config_path: str,
    dtype: jnp.dtype,
    mesh: Mesh | None,
    rules: Mapping[str, MeshAxes],
) -> nnx.Module:
    ckpt = open_checkpoint(folder)
    table = list(table)
    check_checkpoint(ckpt, table, config_path)
    mesh = mesh if mesh is not None else current_mesh()
    graphdef, state = nnx.split(nnx.eval_shape(build))
    variables = dict(nnx.to_flat_state(state))
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - {e.flax_path for e in table})
    if unfilled:  # a variable no checkpoint tensor fills would silently keep its random init
        raise ValueError(f"{config_path}: model variables with no checkpoint entry: {unfilled}")
    for entry in table:
        var = variables[entry.flax_path]
        value = np.asarray(entry.to_flax(ckpt.load(entry.torch_key))).astype(dtype, copy=False)
        sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
        var.set_value(jax.device_put(value, sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def load_transformer(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
    remat_policy: str | None = None,
) -> MMDiT:
    """A diffusers `transformer/` folder (config.json + single or sharded safetensors) -> `MMDiT`."""
    raw, config_path = sd3_transformer.read_config(folder)
    cfg = MMDiTConfig.from_diffusers(raw, config_path)

    def build() -> MMDiT:
        return MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation, remat_policy=remat_policy)

    return _place(build, folder, sd3_transformer.param_table(raw), config_path, dtype, mesh, rules)


def flat_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Every variable of `model` (parameters and buffers) as host numpy arrays, by Flax path."""
    return {path: np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(nnx.state(model))}


def transformer_state_dict(model: MMDiT) -> dict[str, np.ndarray]:
    """The diffusers `SD3Transformer2DModel` state dict of `model` (bit-exact, same dtype)."""
    return to_torch_state(flat_params(model), sd3_transformer.param_table(model.config.to_diffusers()))


def save_transformer(model: MMDiT, folder: str, *, max_shard_bytes: int | None = 10 * 2**30) -> None:
    """Write a diffusers `transformer/` folder that `SD3Transformer2DModel.from_pretrained` loads."""
    tensors = transformer_state_dict(model)
    save_checkpoint(tensors, folder, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_diffusers(), f, indent=2)
