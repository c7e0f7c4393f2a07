"""Training checkpoints: an orbax `CheckpointManager` under `WORKDIR/checkpoints/`, written by `Checkpointer`.

The layout (folder name, the `state` and `meta` items, the meta keys readers rely on) and `CheckpointError` are
defined once in `conversion/training_checkpoint.py`, which also reads the adapters back without JAX models (for
`flowsteer_jax.export` and `SD3Pipeline.load_lora`); this module writes and resumes that layout. `state` is
saved from and restored into its shardings, so every host writes and reads its own shards.

The base weights are never saved: they are the model folder's. Orbax commits a step by renaming its temporary
folder when all its items are written, and lists only committed steps, so a half-written checkpoint (a kill -9
mid-save) is never picked up.

Resuming compares the saved `meta` with the run's (`resume_report`) and refuses, in one `CheckpointError` listing
every difference, another base model (its `config.json`, or other weights: `base_fingerprint`, the
`conversion.safetensors_io.weights_fingerprint` of the transformer folder; the same weights at another path are the
same base, a moved folder), other content of the run's other models (`components`: text encoders, tokenizers, VAE),
other prompt texts (`prompts`: their hash, not the file's path), other state shapes, or other run-defining settings
(`RUN_KEYS` and the world's own config section, saved as the meta's `run`). `checkpoint.allow_changes` names settings
whose change is meant (logged, one warning each). A checkpoint saved before these checks (no `base_fingerprint` /
`run` in its meta) resumes with one warning. A step that cannot be read is refused with the steps on disk;
`checkpoint.resume_step` resumes an older one, and the newer steps are then moved to
`WORKDIR/checkpoints_set_aside/`, never deleted (`set_aside`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from conversion.training_checkpoint import (
    CHECKPOINTS,
    META,
    STATE,
    CheckpointError,
    drop_closed_loop_noise,
    error_cause,
)

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
    ("disc", "heads"),
    ("disc", "trunk"),
)
# Settings added after checkpoints were first written: absent from an older checkpoint means this value (the
# behaviour before the key existed), so such a checkpoint still resumes unless the run asks for another value.
ADDED_KEYS: dict[str, Any] = {
    "disc.heads": "final",
    "disc.trunk": "full",
    "loss.gan": "hinge",
    "loss.window_weighting": "uniform",
    "ema.decay": 0.0,
    "ema.start_step": 0,
    "data.text_column": "prompt",
}


# The settings that define a run (dotted config keys; a section means all its keys): a resume must agree on each,
# unless `checkpoint.allow_changes` names it. The world's own section is added by the world (`World.config_section`).
# Not here, so free to change on resume: `train.num_steps` (extending a run is normal) and the rest of `train`,
# `checkpoint.*`, `eval.*`, `mesh.*`, `distributed.*`, `model.path` (the base is checked by its weights:
# `base_fingerprint`, the other components by theirs: `components`), `data.prompts` (checked by its texts: `prompts`),
# `model.attention`/`remat_policy`/`preset` and `data.cache_embeddings`/`cache_max_gib` (how, not what, is
# computed: the cache
# encodes in the loop's batch size, so its embeddings are the loop's, bit for bit).
RUN_KEYS = (
    "seed",
    "world",
    "model.dtype",
    "train.batch_size",
    "data.shuffle",
    "data.negative_prompt",
    "data.max_sequence_length",
    "lora",
    "disc",
    "distill",
    "loss",
    "adv",
    "optim",
    "ema",  # turning it on or off also changes the state's shapes, which no allow_changes permits
)
SET_ASIDE = "checkpoints_set_aside"  # WORKDIR/<this>/<step>: newer steps moved away by a resume from an older one
_ABSENT = object()


def source_commit() -> str | None:
    """The git commit of the flowsteer-jax code running (with `+dirty` for uncommitted changes), or None when it is
    not a git checkout (an installed wheel) or git is missing: the provenance that exports carry."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _lookup(config: dict, key: str) -> Any:
    """The value at dotted `key` in a nested config dict, or `_ABSENT`."""
    value = config
    for part in key.split("."):
        value = value.get(part, _ABSENT) if isinstance(value, dict) else _ABSENT
    return value


def run_settings(config: dict, section: str = "", folders: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{dotted key: value}` of the run-defining settings in a config dict (lists for tuples): `RUN_KEYS` and the
    world's own config `section` (`World.config_section`), less its `folders` (checked by content)."""
    out: dict[str, Any] = {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{key}.{k}", v)
        elif key not in folders:
            out[key] = list(value) if isinstance(value, tuple | list) else value

    for key in RUN_KEYS + ((section,) if section else ()):
        value = _lookup(config, key)
        if value is not _ABSENT:
            visit(key, value)
    return out


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

    def _unreadable(self, step: int, what: str, error: Exception) -> CheckpointError:
        """The refusal of a step that cannot be read: names it, says what failed and how to go on."""
        steps = self.manager.all_steps()
        older = [s for s in steps if s < step]
        hint = (
            f"resume from an older step with --config.checkpoint.resume_step=N (steps on disk: {sorted(steps)}; "
            f"e.g. {max(older)}: the newer steps are then moved to {self.set_aside_dir}/, never deleted)"
            if older
            else f"no older step to resume from (steps on disk: {sorted(steps)}): move {self.directory} aside to "
            "start afresh"
        )
        return CheckpointError(
            f"cannot read checkpoint step {step} in {self.directory}: its {what} failed to load "
            f"({error_cause(error)}); nothing was deleted; {hint}"
        )

    @property
    def set_aside_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), SET_ASIDE)

    def restore(
        self, abstract_state: Any, expect: dict, step: int | None = None, allow: tuple[str, ...] = ()
    ) -> tuple[Any, dict]:
        """`(train_state, meta)` of `step` (default: latest), placed as `abstract_state`'s shardings say.

        `expect` is the meta this run would write; a different base model (config or weights), latent shape,
        structural config key, state shape or run-defining setting not in `allow` is refused with one error
        listing every difference. A step that cannot be read is refused naming it (never deleted). Restoring
        a step older than the newest moves the newer ones to `set_aside_dir` (`set_aside`), so that saving
        from here on can neither skip nor overwrite them.
        """
        steps = self.manager.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise CheckpointError(
                f"checkpoint.resume_step={step}: no such step in {self.directory} (steps on disk: {sorted(steps)})"
            )
        try:
            meta = self.read_meta(step)
        except CheckpointError:
            raise
        except Exception as e:  # orbax/JSON/OS errors of a truncated, garbage or missing file
            raise self._unreadable(step, "meta", e) from None
        problems, notes = resume_report(meta, {**expect, "shapes": leaf_shapes(abstract_state)}, allow)
        if problems:
            raise CheckpointError(
                f"the checkpoint at {self.directory}/{step} was made by a different run; start a new --workdir, "
                "restore the old settings, or allow a setting's change on purpose with "
                "--config.checkpoint.allow_changes='(\"key\",)'. Differences (checkpoint -> this run): "
                + "; ".join(problems)
            )
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        drop_closed_loop_noise()
        try:
            state = self.manager.restore(step, args=args)[STATE]
        except Exception as e:
            raise self._unreadable(step, "train state", e) from None
        for note in notes:
            if jax.process_index() == 0:
                log.warning("resuming step %d: %s", step, note)
        newer = [s for s in steps if s > step]
        if newer:
            self.set_aside(newer)
        return state, meta

    def set_aside(self, steps: list[int]) -> None:
        """Move `steps`' folders to `set_aside_dir` (process 0; the others wait), then re-list the steps."""
        if jax.process_index() == 0:
            os.makedirs(self.set_aside_dir, exist_ok=True)
            for step in sorted(steps):
                target = os.path.join(self.set_aside_dir, str(step))
                if os.path.exists(target):
                    target += f".{int(time.time())}"
                os.rename(os.path.join(self.directory, str(step)), target)
                log.warning(
                    "checkpoint step %d, newer than the one resumed, moved to %s (nothing deleted); drop "
                    "checkpoint.resume_step from later reruns, or they will set aside the steps saved from now on",
                    step,
                    target,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("flowsteer_jax.checkpoint.set_aside")
        self.manager.reload()

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


def _allowed(key: str, allow: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allow)


def resume_report(saved: dict, current: dict, allow: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """`(problems, notes)` of resuming the checkpoint whose meta is `saved` with the run whose meta is `current`.

    Problems refuse the resume: another base (config.json; or weights, `base_fingerprint`, unless `allow` names
    "base_fingerprint"), latent shape, structural key or state shape, and, unless `allow` names them (a dotted
    key, or a prefix such as "optim"): another content of a pipeline component (`components.<name>`), other
    prompt texts or order (`prompts`), and every run-defining setting (`run`, `run_settings`) that changed.
    Notes are logged as warnings: allowed changes, a moved base folder, an unchecked old checkpoint.
    """
    problems, notes = [], []

    def judge(key: str, text: str) -> None:  # a difference: refused, unless `allow` names `key`
        if _allowed(key, allow):
            notes.append(f"allowed change (checkpoint.allow_changes): {text}")
        else:
            problems.append(text)

    def model(meta: dict) -> dict:  # config.json minus bookkeeping ("_diffusers_version", "_name_or_path")
        return {k: v for k, v in (meta.get("transformer_config") or {}).items() if not k.startswith("_")}

    old_path, new_path = saved.get("model_path"), current.get("model_path")
    if model(saved) != model(current):
        problems.append(
            f"base model: checkpoint used {old_path!r}, this run {new_path!r} (their transformer config.json differ)"
        )
    elif "base_fingerprint" in saved:
        old_fp, new_fp = saved.get("base_fingerprint"), current.get("base_fingerprint")
        if old_fp != new_fp:
            text = (
                f"base weights: checkpoint used {old_path!r} (base_fingerprint {old_fp}), this run {new_path!r} "
                f"(base_fingerprint {new_fp}): the same config.json with other weights"
            )
            judge("base_fingerprint", text)
        elif old_path != new_path:
            notes.append(f"base model moved: {old_path!r} -> {new_path!r} (same weights, base_fingerprint {new_fp})")
    if "base_fingerprint" not in saved or "run" not in saved:
        notes.append(
            "the checkpoint predates resume checks (no base_fingerprint / run settings in its meta): its base "
            "weights and run settings cannot be checked"
        )
    if "components" in saved:
        old_c, new_c = saved["components"], current.get("components", {})
        for name in sorted(set(old_c) | set(new_c)):
            old, new = old_c.get(name), new_c.get(name)
            if old != new:
                judge(f"components.{name}", f"components.{name}: fingerprint {old} -> {new} (None: no such component)")
    if "prompts" in saved:
        old_p, new_p = saved["prompts"], current.get("prompts", {})
        if old_p != new_p:
            text = (
                f"prompts: checkpoint trained on {old_p.get('count')} prompts (sha256 {old_p.get('sha256', '')[:12]}), "
                f"this run has {new_p.get('count')} (sha256 {new_p.get('sha256', '')[:12]}): other texts or order"
            )
            judge("prompts", text)
    if "base_fingerprint" in saved and ("components" not in saved or "prompts" not in saved):
        notes.append(
            "the checkpoint predates content checks of the text encoders and prompt texts (no components / prompts "
            "in its meta): they cannot be checked"
        )
    if list(saved.get("latent_shape") or []) != list(current.get("latent_shape") or []):
        problems.append(f"model.latent_shape: {saved.get('latent_shape')} -> {current.get('latent_shape')}")
    structural = {".".join(path) for path in STRUCTURAL_KEYS}
    for path in STRUCTURAL_KEYS:
        old, new = _get(saved.get("config", {}), path), _get(current.get("config", {}), path)
        if old is None and ADDED_KEYS.get(".".join(path), _ABSENT) == new:
            continue
        if old != new:
            problems.append(f"{'.'.join(path)}: {old!r} -> {new!r}")
    if "run" in saved:
        # This run's run-defining keys: one the checkpoint did not record as such (a key made run-defining since,
        # or a world's section before worlds declared theirs) is read from its saved config, else `ADDED_KEYS`;
        # one it recorded that this run does not define the run by (a key checked by content since) is no problem.
        old_run, new_run = saved["run"], current.get("run", {})
        for key in sorted(new_run):
            old, new = old_run.get(key, _lookup(saved.get("config", {}), key)), new_run[key]
            old = list(old) if isinstance(old, tuple) else old
            if old is _ABSENT and key in ADDED_KEYS:
                old = ADDED_KEYS[key]
            if old == new or key in structural:
                continue
            judge(key, f"{key}: {'(absent)' if old is _ABSENT else repr(old)} -> {new!r}")
    old_shapes, new_shapes = saved.get("shapes", {}), current.get("shapes", {})
    if old_shapes != new_shapes:
        changed = sorted(k for k in set(old_shapes) | set(new_shapes) if old_shapes.get(k) != new_shapes.get(k))
        problems.append(f"train state shapes differ at {len(changed)} leaves, e.g. {changed[:3]}")
    return problems, notes


def compatibility_problems(saved: dict, current: dict, allow: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a checkpoint's meta and the meta this run would write that refuse a
    resume (`resume_report`'s problems)."""
    return resume_report(saved, current, allow)[0]
