"""Logical axis names -> `NamedSharding` over a `('data', 'fsdp', 'tensor')` mesh.

Parameters carry `logical_axes` metadata; a rules table (from the config) maps each logical name to mesh
axes. A mesh axis that does not divide a dimension is dropped for that dimension, so one rules table works
from 1 device to a pod and for tiny test models alike. Activations are pinned the same way, by logical name:
`constrain(x, ("batch", None, None))` resolves through the rules and mesh a program is traced under
(`traced_on`), and is a no-op outside one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conversion.errors import InputError

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "adaln": "tensor",
    "layers": None,
    "lora_rank": None,
}


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions are named `axes`; unnamed -> replicated."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = rules.get(name) if name is not None else None
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        kept: list[str] = []
        size = 1
        for ax in mesh_axes or ():
            n = mesh.shape[ax]
            if ax not in used and n > 1 and dim % (size * n) == 0:
                kept.append(ax)
                size *= n
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def current_mesh() -> Mesh | None:
    """The concrete mesh set with `jax.set_mesh(...)`, or None outside one."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def current_platform() -> str:
    """Platform of the mesh being traced for (`jax.set_mesh`, `use_abstract_mesh`), else the default backend.

    A compile-only GPU/TPU mesh (`flowsteer_jax.chips`) names its chip here while the process runs on CPU.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


# XLA options our programs need from the GPU compiler, set per executable (GPU targets only, nothing global).
GPU_COMPILER_OPTIONS = {
    # XLA 0.10.2's Triton GEMM emitter fails on the FSDP train step's bf16 products ("Couldn't find output tile
    # sizes that satisfy ... dot bf16[2664,4608]", 8x H100, mesh (1, 8, 1)); cuBLAS takes them instead.
    "xla_gpu_enable_triton_gemm": False,
}


def compiler_options(mesh: Mesh) -> dict | None:
    """`jax.jit(compiler_options=...)` for programs over `mesh`: GPU_COMPILER_OPTIONS on GPUs, else None."""
    return dict(GPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "gpu" else None


# The logical-axis rules of the program being traced (`traced_on`); None outside one. A context variable, like
# jax's own mesh context: scoped to the trace, so nothing leaks between programs or threads.
_RULES: contextvars.ContextVar[Mapping[str, MeshAxes] | None] = contextvars.ContextVar("flowsteer_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, MeshAxes]) -> Iterator[None]:
    """Within the block, `constrain` resolves logical names through `rules`."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def traced_on(mesh: Mesh, fn, rules: Mapping[str, MeshAxes] | None = None):
    """`fn` traced under `mesh`'s abstract mesh (so the code inside sees the target, `current_platform`) and,
    with `rules`, under those logical-axis rules (so `constrain` pins activations)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
            if rules is not None:
                stack.enter_context(axis_rules(rules))
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the sharding its logical `axes` name under the active rules and mesh; else `x` unchanged.

    A no-op outside `traced_on(mesh, fn, rules)` and on a single-device mesh.
    """
    rules, mesh = _RULES.get(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def logical_sharding(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def variable_sharding(variable, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an NNX Variable (concrete or abstract) from its `logical_axes` metadata."""
    return logical_sharding(variable.get_metadata().get("logical_axes"), variable.shape, mesh, rules)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'tensor'); one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    known = 1
    for s in shape:
        known *= s if s != -1 else 1
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // known
    total = 1
    for s in shape:
        total *= s
    if total != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {total} devices, {len(devices)} available")
    # Auto axes: XLA's sharding propagation decides intermediates; we constrain only inputs and params.
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(shape), ("data", "fsdp", "tensor"), axis_types=auto, devices=devices)


# --- Trainer helpers (distillation step): processes, mesh from a config, shardings of states and batches. ---


def initialize_distributed(d) -> None:
    """`jax.distributed.initialize` as the config's `distributed` block asks (before anything touches a device)."""
    if d.coordinator_address:
        if int(d.num_processes) > 1:
            # Cross-process collectives on CPU need gloo; GPU/TPU clients ignore this setting.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address, num_processes=int(d.num_processes), process_id=int(d.process_id)
        )
    elif d.auto:
        jax.distributed.initialize()


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh(config.mesh.shape)`; `config` is the distillation ConfigDict (or anything with `.mesh.shape`).

    A shape the devices cannot fill is the user's `mesh.shape`: an `InputError` naming it."""
    shape = tuple(config.mesh.shape)
    try:
        return make_mesh(shape, devices)
    except ValueError as e:
        n = len(jax.devices() if devices is None else devices)
        raise InputError(f"mesh.shape={shape} does not fit the {n} device(s): {e}") from e


def rules_from_config(config) -> dict[str, MeshAxes]:
    """The config's `mesh.rules` table as a plain dict (tuples kept, lists turned into tuples)."""
    rules = dict(config.mesh.rules)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in rules.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension over the rules' `batch` axes, the rest replicated; a prefix for any rank."""
    axes = rules.get("batch")
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES):
    """Shardings for a pytree of NNX Variables (params, optax states built on them) and plain arrays.

    Each Variable (concrete or abstract) is placed by its `logical_axes`; other leaves (step counters,
    optax `count`s, keys) are replicated. The result is a prefix tree usable as `jax.jit` in/out shardings.
    """
    from flax import nnx  # local: keep this module importable without flax for conversion tools

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return variable_sharding(leaf, mesh, rules)
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
