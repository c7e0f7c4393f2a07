"""The training checkpoint layout, and a reader of the LoRA adapters (and the run's metadata) it holds.

This module owns the layout: the trainer's writer (`flowsteer_jax/checkpoint.py`, `Checkpointer`) imports the
names below, and so does every reader. An orbax `CheckpointManager` in `WORKDIR/checkpoints/` (`CHECKPOINTS`)
keeps one folder per step with two items (`ITEMS`):

- `state` (`STATE`, `StandardSave`): the whole train state `{"step", "nonfinite", "params": {"lora", "disc"},
  "opt_state"}`, plus `"ema"` when the run keeps an EMA of the adapters (`ema.decay > 0`), saved from and restored
  into its shardings; the adapters are the `params.lora` subtree (`LORA_TREE`), their EMA `EMA_TREE`;
- `meta` (`META`, `JsonSave`): `step`, `config` (the run's config as a dict), `transformer_config` (the base's
  `config.json`) -- the keys readers rely on, `META_REQUIRED` -- plus `model_path`, `latent_shape`, `shapes`
  (every state leaf's shape, by path), `data` (the prompt loader's position) and `time`.

`read_lora` restores `meta` and only the adapters of `state` (their EMA when the run kept one, else
`params.lora`; no optimizer state, no discriminator), as host numpy arrays keyed by dotted Flax path
(`"transformer_blocks.0.attn.to_q.lora_a"`).

numpy + orbax only: never imports flowsteer_jax (or torch).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import numpy as np

from conversion.lora import LORA_LEAVES
from conversion.safetensors_io import ConversionError

CHECKPOINTS = "checkpoints"  # the orbax manager's folder inside a training workdir
STATE, META = "state", "meta"  # the items of each step folder
ITEMS = (STATE, META)
META_REQUIRED = ("step", "config", "transformer_config")
LORA_TREE = ("params", "lora")  # where the adapters sit in the `state` item
EMA_TREE = ("ema",)  # their moving average, present when the run's ema.decay > 0


class CheckpointError(ConversionError, RuntimeError):
    """A training checkpoint is missing, incomplete, from a different run, or not what a reader expects.

    One class for the writer (`flowsteer_jax/checkpoint.py`) and the readers. Both bases on purpose: readers of a
    checkpoint as an input file (the exporter's and `sample --lora`'s `except ConversionError`, itself a
    ValueError) catch it as a conversion problem, while to the trainer a refused resume has always been a
    RuntimeError, as it is to any caller that catches that.
    """


def checkpoint_dir(workdir: str) -> str:
    """`WORKDIR/checkpoints` (the orbax manager's directory); `workdir` may also name that folder itself."""
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{workdir}: no such directory (expected a training workdir with {CHECKPOINTS}/)")
    inner = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(inner):
        return os.path.abspath(inner)  # orbax refuses relative paths
    if os.path.basename(os.path.normpath(workdir)) == CHECKPOINTS:
        return os.path.abspath(workdir)
    raise CheckpointError(f"{workdir}: no {CHECKPOINTS}/ folder (not a training workdir, or nothing saved yet)")


def _steps_on_disk(directory: str) -> tuple[list[int], list[str]]:
    """(committed step numbers, names of in-progress/aborted temporary step folders)."""
    steps, partial = [], []
    for name in os.listdir(directory):
        if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
            steps.append(int(name))
        elif re.match(r"^\d+\..*tmp", name):
            partial.append(name)
    return sorted(steps), sorted(partial)


def _manager(directory: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False),
    )


def resolve_step(workdir: str, step: int | None = None) -> tuple[str, int]:
    """(checkpoint directory, step): the latest committed step unless `step`; checks the step folder's items."""
    directory = checkpoint_dir(workdir)
    steps, partial = _steps_on_disk(directory)
    if step is None:
        if not steps:
            extra = f" (only unfinished step folders: {partial})" if partial else ""
            raise CheckpointError(f"{directory}: no checkpoints{extra}")
        step = steps[-1]
    elif step not in steps:
        unfinished = [p for p in partial if p.split(".")[0] == str(step)]
        why = f"step {step} was not finished ({unfinished[0]})" if unfinished else f"step {step} not found"
        raise CheckpointError(f"{directory}: {why}; available steps: {steps or 'none'}")
    step_dir = os.path.join(directory, str(step))
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
        others = [s for s in steps if s != step]
        raise CheckpointError(
            f"{step_dir}: incomplete checkpoint, missing item(s) {missing} (expected {list(ITEMS)}); "
            f"other steps on disk: {others or 'none'}"
        )
    return directory, int(step)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


def flat_lora_from_tree(tree: Any, source: str) -> dict[str, np.ndarray]:
    """A restored `params["lora"]` tree (nested dicts; nnx.State leaves may be wrapped as `{"value": x}`) ->
    `{"<module path>.lora_a": array, ...}`."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in _flatten(tree).items():
        if path and path[-1] == "value":
            path = path[:-1]
        if not path or path[-1] not in LORA_LEAVES:
            name = ".".join(path)
            raise CheckpointError(f"{source}: unexpected LoRA parameter {name!r} (expected *.lora_a / *.lora_b)")
        out[".".join(path)] = np.asarray(leaf)
    if not out:
        raise CheckpointError(f"{source}: the checkpoint holds no LoRA parameters")
    return out


# What orbax, tensorstore, json and the OS raise for a step folder that cannot be read (truncated or garbage
# files, a missing file inside an item): reported as a CheckpointError naming the step.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)


def _closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def drop_closed_loop_noise() -> None:
    """After a failed orbax read, tensorstore reads still in flight complete into orbax's already closed asyncio
    loop, and Python prints each `RuntimeError: Event loop is closed` as a bare traceback (as an unraisable
    exception, or through `sys.excepthook`), during or after the failing call. Installed before each read: drops
    exactly those (process-wide, once), so a failure stays the one line the caller reports."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook
    if getattr(unraisable, "drops_closed_loop", False):
        return

    def on_unraisable(info):
        if not _closed_loop(info.exc_value):
            unraisable(info)

    def on_exception(kind, value, tb):
        if not _closed_loop(value):
            excepthook(kind, value, tb)

    on_unraisable.drops_closed_loop = True
    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


def error_cause(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of a read failure on one line, cut to `limit` characters (orbax's run to pages)."""
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    return cause if len(cause) <= limit else cause[: limit - 3] + "..."


def unreadable(directory: str, step: int, e: BaseException) -> CheckpointError:
    """The CheckpointError for a step that exists on disk but cannot be read, listing the other steps."""
    others = [s for s in _steps_on_disk(directory)[0] if s != step]
    cause = error_cause(e)
    return CheckpointError(
        f"{os.path.join(directory, str(step))}: step {step} cannot be read ({cause}); "
        f"other steps on disk: {others or 'none'}; nothing was deleted"
    )


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The `meta` item of a step (latest unless `step`), checked for the keys exporters rely on."""
    import orbax.checkpoint as ocp

    directory, step = resolve_step(workdir, step)
    drop_closed_loop_noise()
    try:
        mgr = _manager(directory)
        try:
            meta = mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        finally:
            mgr.close()
    except READ_ERRORS as e:
        raise unreadable(directory, step, e) from e
    return _check_meta(meta, os.path.join(directory, str(step), META))


def _check_meta(meta: Any, source: str) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: meta is not a JSON object")
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks {missing} (written by an older or different trainer?)")
    lora = meta["config"].get("lora") if isinstance(meta["config"], dict) else None
    if not isinstance(lora, dict) or not {"rank", "alpha"} <= set(lora):
        raise CheckpointError(f"{source}: meta config has no lora.rank / lora.alpha")
    return meta


def uses_ema(meta: dict) -> bool:
    """Whether the run of a checkpoint's `meta` kept an EMA of its adapters (and so saved `EMA_TREE`)."""
    ema = meta["config"].get("ema")
    return isinstance(ema, dict) and bool(ema.get("decay"))


def read_lora(workdir: str, step: int | None = None, *, ema: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """`(flat LoRA params by dotted Flax path, meta dict)` of a training workdir's checkpoint.

    Latest committed step unless `step`. Restores only the adapters (not the optimizer state or the
    discriminator) onto the host as numpy arrays: their EMA (`EMA_TREE`) when the run kept one and `ema`, else
    `state.params.lora`. Raises `CheckpointError` naming the folder when there are no
    checkpoints, the step is absent (listing those available), an item is missing, or the step cannot be read
    (truncated or garbage files: orbax's, tensorstore's, json's and OS errors, listing the other steps).
    """
    directory, step = resolve_step(workdir, step)
    step_dir = os.path.join(directory, str(step))
    drop_closed_loop_noise()
    try:
        restored, where = _restore_lora(directory, step, step_dir, ema)
    except CheckpointError:
        raise
    except READ_ERRORS as e:
        raise unreadable(directory, step, e) from e
    meta = _check_meta(restored[META], os.path.join(step_dir, META))
    return flat_lora_from_tree(_subtree(restored[STATE], where), f"{step_dir}/{STATE}"), meta


def _restore_lora(directory: str, step: int, step_dir: str, ema: bool) -> tuple[dict, tuple[str, ...]]:
    """`({STATE: <the adapters' subtree>, META: ...}, where)` of one step, restored onto the host; `where` is
    `EMA_TREE` when `ema` and the state holds one, else `LORA_TREE`."""
    import orbax.checkpoint as ocp

    mgr = _manager(directory)
    try:
        tree = mgr.item_metadata(step)[STATE]
        tree = tree.tree if hasattr(tree, "tree") else tree
        where = EMA_TREE if ema and EMA_TREE[0] in tree else LORA_TREE
        try:
            lora_md = _subtree(tree, where)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{step_dir}/{STATE}: no {'.'.join(where)} in the saved state ({e!r})") from e
        leaves = _flatten(_as_dict(lora_md))
        item = _nest(where, _unflatten({p: np.zeros(m.shape, m.dtype) for p, m in leaves.items()}))
        restore_args = _nest(where, _unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in leaves}))
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
                META: ocp.args.JsonRestore(),
            }
        )
        restored = mgr.restore(step, args=args)
    finally:
        mgr.close()
    return restored, where


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _nest(path: tuple[str, ...], tree: Any) -> dict:
    """`tree` placed at `path` (`("params", "lora")` -> `{"params": {"lora": tree}}`)."""
    for key in reversed(path):
        tree = {key: tree}
    return tree


def _as_dict(tree: Any) -> Any:
    """Orbax metadata trees are Mapping-like; turn them into plain nested dicts."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {str(k): _as_dict(v) for k, v in tree.items()}
    return tree


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out
