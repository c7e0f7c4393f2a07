"""Training checkpoints: an orbax `CheckpointManager` under `WORKDIR/checkpoints/`, written by `Checkpointer`.

The layout (folder name, the `state` and `meta` items, the meta keys readers rely on) and `CheckpointError` are
defined once in `conversion/training_checkpoint.py`, which also reads the adapters back without JAX models (for
`flowsteer_jax.export` and `SD3Pipeline.load_lora`); this module writes and resumes that layout. `state` is
saved from and restored into its shardings, so every host writes and reads its own shards.

The base weights are never saved: they are the model folder's. Orbax commits a step by renaming its temporary
folder when all its items are written, and lists only committed steps, so a half-written checkpoint (a kill -9
mid-save) is never picked up. Resuming compares the saved `meta` with the run's and refuses a different base
model or different state shapes, naming what changed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from conversion.training_checkpoint import CHECKPOINTS, META, STATE, CheckpointError

log = logging.getLogger(__name__)

# The parts of a run's config that fix the train state's structure; a resume must agree on all of them.
STRUCTURAL_KEYS = (
    ("lora", "rank"),
    ("lora", "alpha"),
    ("lora", "targets"),
    ("lora", "dtype"),
    ("disc", "num_blocks"),
    ("disc", "head"),
    ("disc", "param_dtype"),
)


def leaf_shapes(tree: Any) -> dict[str, list[int]]:
    """`{path: shape}` of every leaf (arrays or ShapeDtypeStructs): what a resume must match."""
    return {
        jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


class Checkpointer:
    """Save/restore the train state and its metadata; keeps the newest `keep` steps."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, train_state: Any, meta: dict) -> bool:
        """Start saving `step` (asynchronously: the next save or `wait()` finishes it). False if it exists."""
        if step in self.manager.all_steps():
            return False
        meta = {**meta, "step": int(step), "time": time.time(), "shapes": leaf_shapes(train_state)}
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(train_state), META: ocp.args.JsonSave(meta)})
        return self.manager.save(step, args=args, force=True)

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def restore(self, abstract_state: Any, expect: dict, step: int | None = None) -> tuple[Any, dict]:
        """`(train_state, meta)` of `step` (default: latest), placed as `abstract_state`'s shardings say.

        `expect` is the meta this run would write; a different base model, latent shape, structural config
        key or state shape is refused with one error listing every difference.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        meta = self.read_meta(step)
        problems = compatibility_problems(meta, {**expect, "shapes": leaf_shapes(abstract_state)})
        if problems:
            raise CheckpointError(
                f"the checkpoint at {self.directory}/{step} was made by a different run; start a new --workdir "
                "or restore the old settings:\n  " + "\n  ".join(problems)
            )
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        return self.manager.restore(step, args=args)[STATE], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _get(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return list(config) if isinstance(config, tuple | list) else config


def compatibility_problems(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's meta and the meta this run would write."""
    problems = []

    def model(meta: dict) -> dict:  # config.json minus bookkeeping ("_diffusers_version", "_name_or_path")
        return {k: v for k, v in (meta.get("transformer_config") or {}).items() if not k.startswith("_")}

    if model(saved) != model(current):
        problems.append(
            f"base model: checkpoint used {saved.get('model_path')!r}, this run {current.get('model_path')!r} "
            "(their transformer config.json differ)"
        )
    if list(saved.get("latent_shape") or []) != list(current.get("latent_shape") or []):
        problems.append(f"model.latent_shape: {saved.get('latent_shape')} -> {current.get('latent_shape')}")
    for path in STRUCTURAL_KEYS:
        old, new = _get(saved.get("config", {}), path), _get(current.get("config", {}), path)
        if old != new:
            problems.append(f"{'.'.join(path)}: {old!r} -> {new!r}")
    old_shapes, new_shapes = saved.get("shapes", {}), current.get("shapes", {})
    if old_shapes != new_shapes:
        changed = sorted(k for k in set(old_shapes) | set(new_shapes) if old_shapes.get(k) != new_shapes.get(k))
        problems.append(f"train state shapes differ at {len(changed)} leaves, e.g. {changed[:3]}")
    return problems
