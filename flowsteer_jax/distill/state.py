"""Train state for the distillation step: plain dicts of NNX States, built once from the config.

```
train_state = {"step": int32, "nonfinite": int32,          # steps skipped for a non-finite loss/gradient
               "params": {"lora": State, "disc": State},   # "disc" only when the discriminator is used
               "opt_state": optax state of optax.partition({"lora": ..., "disc": ...}),
               "ema": State}                               # only with ema.decay > 0: the LoRA's moving average
frozen      = {"base": State,                              # the one copy of the MMDiT weights (teacher)
               "disc": State}                              # D's non-trainable buffers (positional table)
```
`Graphs` holds the static halves (`nnx.GraphDef`s) and the shardings; `make_step` consumes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flowsteer_jax import parallel
from flowsteer_jax.distill.config import uses_discriminator
from flowsteer_jax.models.discriminator import Discriminator
from flowsteer_jax.models.lora import apply_lora, split_lora
from flowsteer_jax.models.mmdit import MMDiT

# `disc.trunk` -> what of the discriminator trains (the rest joins `frozen["disc"]`): everything (the paper's
# choice), the heads alone, or LoRA adapters on the trunk plus the heads (the paper's Table 4).
_HEADS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("head"), nnx.PathContains("block_heads")))
DISC_TRAINABLE = {"full": nnx.Param, "frozen": _HEADS, "lora": nnx.Any(nnx.LoRAParam, _HEADS)}


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static structure of a train state: graphdefs, mesh, rules and the shardings of state and frozen."""

    student: nnx.GraphDef  # base + LoRA (teacher = the same graph with LoRA switched off)
    disc: nnx.GraphDef | None
    mesh: Mesh
    rules: dict
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding  # a batch's leading dimension over the rules' `batch` axes


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The MMDiT constructor options the config asks for (`MMDiT(cfg, rngs=..., **model_options(config))`,
    `load_transformer(folder, **model_options(config))`); `make_train_state` checks the model has them."""
    m = config.model
    return dict(dtype=jnp.dtype(m.dtype), implementation=m.attention or None, remat_policy=m.remat_policy or None)


def _schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
    if c.schedule == "constant":
        main = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.lr, max(int(c.total_steps) - int(c.warmup_steps), 1))
    else:
        raise ValueError(f"optim schedule {c.schedule!r} not in ('constant', 'cosine')")
    if not c.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, c.lr, int(c.warmup_steps))
    return optax.join_schedules([warmup, main], [int(c.warmup_steps)])


def schedules(config: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
    names = ("lora", "disc") if uses_discriminator(config) else ("lora",)
    return {name: _schedule(config.optim[name]) for name in names}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`optax.partition` over the top-level keys of `params`: AdamW + global-norm clipping per branch."""
    branches = {}
    for name, sched in schedules(config).items():
        c = config.optim[name]
        chain = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm else []
        chain.append(optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))
        branches[name] = optax.chain(*chain)
    return optax.partition(branches, {name: name for name in branches})


def make_train_state(
    config: ml_collections.ConfigDict,
    base_model: MMDiT,
    *,
    mesh: Mesh | None = None,
    place: bool = True,
) -> tuple[dict, dict, Graphs]:
    """`(train_state, frozen, graphs)` from a (pretrained) MMDiT. Mutates `base_model`.

    The discriminator trunk is copied from `base_model` first (new buffers); then LoRA adapters are added
    to `base_model` in place (its weights are *not* copied: `frozen["base"]` holds the same arrays; load it
    on the mesh, `load_transformer(..., mesh=...)`, so placing it here moves nothing). `place=False` skips
    `device_put` (for abstract states under `jax.eval_shape`).
    """
    mesh = parallel.mesh_from_config(config) if mesh is None else mesh
    rules = parallel.rules_from_config(config)
    want = model_options(config)["remat_policy"]
    if base_model.remat_policy != want:
        raise ValueError(
            f"the model was built with remat_policy={base_model.remat_policy!r} but config.model.remat_policy "
            f"asks for {want!r}: build it with `**model_options(config)`"
        )
    rngs = nnx.Rngs(params=config.seed)

    def add_lora(model: nnx.Module, param_dtype: str) -> None:  # the run's adapters: the student's, a LoRA D trunk's
        apply_lora(
            model,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            targets=tuple(config.lora.targets),
            rngs=rngs,
            param_dtype=jnp.dtype(param_dtype),
        )

    params, frozen, disc_graph = {}, {}, None
    if uses_discriminator(config):
        disc = Discriminator.from_mmdit(
            base_model,
            config.disc.num_blocks,
            head=config.disc.head,
            heads=config.disc.heads,
            rngs=rngs,
            param_dtype=jnp.dtype(config.disc.param_dtype),
        )
        if config.disc.trunk == "lora":  # zero-init adapters: D starts as the same copy of the teacher's blocks
            add_lora(disc, config.disc.param_dtype)
        disc_graph, params["disc"], frozen["disc"] = nnx.split(disc, DISC_TRAINABLE[config.disc.trunk], ...)
    add_lora(base_model, config.lora.dtype)
    student_graph, params["lora"], frozen["base"] = split_lora(base_model)
    params = {k: params[k] for k in ("lora", "disc") if k in params}
    train_state = {
        "step": jnp.zeros((), jnp.int32),
        "nonfinite": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": make_optimizer(config).init(params),
    }
    if config.ema.decay > 0:  # a copy, not the same buffers: the step donates the whole state
        train_state["ema"] = jax.tree.map(jnp.copy, params["lora"])
    graphs = Graphs(
        student=student_graph,
        disc=disc_graph,
        mesh=mesh,
        rules=rules,
        state_shardings=parallel.tree_shardings(train_state, mesh, rules),
        frozen_shardings=parallel.tree_shardings(frozen, mesh, rules),
        batch_sharding=parallel.batch_sharding(mesh, rules),
    )
    if place:
        train_state = jax.device_put(train_state, graphs.state_shardings)
        frozen = jax.device_put(frozen, graphs.frozen_shardings)
    return train_state, frozen, graphs


def student_lora(train_state: dict) -> Any:
    """The LoRA the student is sampled, evaluated and exported with: the EMA when the run keeps one."""
    return train_state["ema"] if "ema" in train_state else train_state["params"]["lora"]


def abstract_train_state(config: ml_collections.ConfigDict, build_model, *, mesh: Mesh | None = None):
    """`make_train_state` on `build_model()` without allocating: abstract `(train_state, frozen, graphs)`."""
    box = {}

    def build():
        state, frozen, graphs = make_train_state(config, build_model(), mesh=mesh, place=False)
        box["graphs"] = graphs
        return state, frozen

    state, frozen = jax.eval_shape(build)
    return state, frozen, box["graphs"]


def place_batch(batch: dict, graphs: Graphs) -> dict:
    """Put a host batch on the mesh, batch dimension over the rules' `batch` axes (as the step expects)."""
    return jax.device_put(batch, graphs.batch_sharding)
