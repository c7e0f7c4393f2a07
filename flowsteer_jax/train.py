"""The FlowSteer training run.

    python -m flowsteer_jax.train --config=configs/sd3_medium.py --workdir=runs/sd3m \\
        --config.model.path=/data/sd3-medium --config.data.prompts=prompts.txt [--config.a.b=v ...]

The config is locked: a mistyped `--config.` key is an error naming it. Starting with a `--workdir` that holds
a checkpoint resumes it, bit for bit (same LoRA, discriminator, optimizer state, step, data position; the
per-step noise is `fold_in(PRNGKey(seed), step)`), and refuses if the base model or the state's shapes
changed. SIGTERM or SIGINT finishes the current step, saves a checkpoint and exits cleanly (exit code 0), so
a preempted job simply reruns the same command.

Per step: each process reads its slice of the global prompt batch (`data.py`), encodes it on its own devices
(or reads cached embeddings), the slices become one global batch on the mesh, and the one jitted FlowSteer
step (`distill/step.py`) runs. Process 0 alone writes logs: a tqdm bar, TensorBoard scalars in
`WORKDIR/tb` (with `log.wandb` also to Weights & Biases: `tracking.py`), and every `eval.every_steps` a PNG
grid of the student's few-step samples from fixed prompts and noise in `WORKDIR/samples/`. Orbax writes the
checkpoint from every process. A step with a non-finite loss or gradient changes nothing (the step keeps the old
state); `train.max_bad_steps` of them in a row abort the run with the last good checkpoint kept.

Every config value is checked first (`distill.config.validate`), before any device, file or model is touched.
A bad value, path or prompt file is one line `flowsteer_jax.train: error: ...` on stderr and exit code 2 (a bad
flag: `... bad flag: ...`, also 2); a run aborted for non-finite steps exits with 3.

What is trained on comes from a world (`flowsteer_jax.worlds`, chosen by `config.world`): the SD3 folder and
a prompt file, the embedded digits world, or a module of your own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import ConfigDict, config_flags

from conversion.errors import InputError, shorten
from conversion.safetensors_io import read_json, weights_fingerprint
from flowsteer_jax import cli, outputs, parallel, tracking
from flowsteer_jax.checkpoint import Checkpointer, CheckpointError, run_settings, source_commit
from flowsteer_jax.data import EmbeddingCache, PromptLoader, prompts_digest
from flowsteer_jax.distill import make_step, make_train_state, model_options
from flowsteer_jax.distill.config import config_latent_shape, validate, validate_batch, validate_model
from flowsteer_jax.distill.ota import window_boundaries
from flowsteer_jax.distill.state import student_lora
from flowsteer_jax.evaluation.metrics import eval_scorer
from flowsteer_jax.flow.sampling import model_velocity
from flowsteer_jax.flow.sampling import sample as flow_sample
from flowsteer_jax.images import save_grid
from flowsteer_jax.models.lora import set_lora_enabled
from flowsteer_jax.worlds import World, make_world

log = logging.getLogger("flowsteer_jax.train")
PROG = "flowsteer_jax.train"


class TrainingAborted(RuntimeError):
    pass


def make_sampler(graphs, bounds: np.ndarray, num_train_timesteps: int) -> Callable:
    """Jitted student sampling: one guidance-free Euler step per window, replicated output."""
    rep = parallel.replicated(graphs.mesh)

    def sample(lora, base, noise, prompt_embeds, pooled):
        model = set_lora_enabled(nnx.merge(graphs.student, lora, base, copy=True), True)
        cond = {"prompt_embeds": prompt_embeds, "pooled": pooled}
        return flow_sample(model_velocity(model, num_train_timesteps), noise, jnp.asarray(bounds), cond)

    return jax.jit(parallel.traced_on(graphs.mesh, sample, graphs.rules), out_shardings=rep)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated global array as numpy on any process (multi-host arrays are not fully addressable)."""
    return np.asarray(x.addressable_data(0))


class _StopSignal:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_everywhere(local: bool) -> bool:
    """All processes must agree to stop (a save is collective); the signal may reach only some of them."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def latent_shape_of(
    config: ml_collections.ConfigDict, world: World, tc: dict, source: str = "config.json"
) -> tuple[int, int, int]:
    """The world's, else `model.latent_shape`, else the transformer config's (`tc`, from `source`) sample_size
    square."""
    if world.latent_shape is not None:
        return tuple(world.latent_shape)
    return config_latent_shape(config, tc, source)


def check_workdir(workdir: str) -> None:
    """`workdir` is (or can be made) a folder this process can write: one `InputError` naming it, not a traceback
    from the first checkpoint or log written minutes later."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"--workdir={workdir}: exists and is not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise InputError(f"--workdir={workdir}: cannot create the folder ({e.strerror})") from e
    try:  # a real write: os.access says yes to root in a read-only folder and knows nothing of quotas
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise InputError(f"--workdir={workdir}: cannot write in the folder ({e.strerror})") from e


def _diverged(ckpt: Checkpointer, step: int, bad_run: int, where: str) -> str:
    """The one line of a run stopped by `bad_run` non-finite steps up to `step` (nothing saved for them)."""
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else "no checkpoint"
    rerun = "rerun to resume from it" if last is not None else "rerun to start afresh"
    return (
        f"{bad_run} non-finite steps in a row ({where}) at step {step}, none saved; {kept}. Lower the learning "
        f"rates (optim.lora.lr, optim.disc.lr) or check the data, then {rerun}."
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the last step's metrics (host floats) and `step`.

    One run per workdir: process 0 holds `WORKDIR/train.lock` and logs to `WORKDIR/train.log` (`outputs`)."""
    validate(config)  # every value, before any device, file or model is touched
    tracking.check(config)
    outputs.check_workdir(workdir)
    check_workdir(workdir)
    parallel.initialize_distributed(config.distributed)
    lock = _lock_workdir(workdir)
    try:
        with cli.log_to(os.path.join(workdir, outputs.log_name(PROG))) if lock else contextlib.nullcontext():
            return _train(config, workdir)
    finally:
        if lock:
            outputs.unlock_workdir(lock)


def _lock_workdir(workdir: str) -> str | None:
    """Process 0 takes the workdir's lock (its path back); every process stops when it could not."""
    lock, problem = None, None
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        try:
            lock = outputs.lock_workdir(workdir)
        except InputError as e:
            problem = e
    if _stop_everywhere(problem is not None):
        raise problem or InputError(f"--workdir={workdir}: process 0 could not take the workdir's lock")
    return lock


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from flowsteer_jax.models.loading import load_transformer

    is_main = jax.process_index() == 0
    mesh = parallel.mesh_from_config(config)
    rules = parallel.rules_from_config(config)
    n_batch = int(np.prod([mesh.shape[a] for a in np.atleast_1d(rules.get("batch") or ()) if a]))
    batch_size, procs = int(config.train.batch_size), jax.process_count()
    validate_batch(config, n_batch, procs)
    world = make_world(config, workdir)
    config_path = os.path.join(world.transformer_folder, "config.json")
    transformer_config = read_json(config_path, "transformer config")  # as the file has it: the checkpoint's meta
    latent_shape = latent_shape_of(config, world, transformer_config, config_path)
    validate_model(config, transformer_config, latent_shape, config_path)  # the SD3 world checked before its encoders
    if config.distill.start_points == "interpolate" and world.x0 is None:
        raise InputError("distill.start_points='interpolate' (PeRFlow) needs data latents; this world has prompts only")

    base = load_transformer(world.transformer_folder, mesh=mesh, rules=rules, **model_options(config))
    train_state, frozen, graphs = make_train_state(config, base, mesh=mesh)
    step_fn = make_step(config, graphs, latent_shape, num_train_timesteps=world.num_train_timesteps)
    rng = jax.random.PRNGKey(int(config.seed))
    config_json = _config_dict(config)
    ckpt = Checkpointer(workdir, keep=int(config.checkpoint.keep))

    loader_kw = dict(
        seed=int(config.seed), shuffle=bool(config.data.shuffle), process_index=jax.process_index(), process_count=procs
    )
    position = 0
    meta_base = {
        "config": config_json,
        "model_path": world.model_path,
        "transformer_config": transformer_config,
        "latent_shape": list(latent_shape),
        "base_fingerprint": weights_fingerprint(world.transformer_folder),
        "components": dict(world.components),
        "prompts": {"count": len(world.prompts), "sha256": prompts_digest(world.prompts)},
        "run": run_settings(config_json, world.config_section, world.config_folders),
        "commit": source_commit(),
    }
    resume_step = int(config.checkpoint.resume_step)
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), train_state)
        train_state, meta = ckpt.restore(
            abstract,
            meta_base,
            step=None if resume_step < 0 else resume_step,
            allow=tuple(config.checkpoint.allow_changes),
        )
        position = int(meta["data"]["position"])
        if is_main:
            log.info("resumed from %s at step %d", ckpt.directory, int(meta["step"]))
    elif resume_step >= 0:
        raise CheckpointError(f"checkpoint.resume_step={resume_step}, but {ckpt.directory} holds no checkpoint")
    loader = PromptLoader(len(world.prompts), batch_size, position=position, **loader_kw)
    if is_main:  # through a rename: a full disk mid-write leaves the previous run's config.json whole
        path = os.path.join(workdir, "config.json")
        with open(f"{path}.tmp-{os.getpid()}", "w") as f:
            json.dump(config_json, f, indent=2)
        os.replace(f.name, path)

    local_b = batch_size // procs
    cache = None
    if config.data.cache_embeddings:
        # Encoded in the loop's batch size, so the cached rows are bit-identical to encoding in the loop.
        cache = EmbeddingCache.build(
            os.path.join(workdir, "embeddings"),
            world.prompts,
            world.encode,
            batch_size=local_b,
            fingerprint=f"{world.fingerprint}-batch{local_b}",
            is_writer=is_main,
            max_gib=float(config.data.cache_max_gib),
        )
    negative = world.encode([config.data.negative_prompt])

    def next_batch() -> dict[str, jax.Array]:
        idx = loader.next()
        emb = cache.get(idx) if cache is not None else world.encode([world.prompts[i] for i in idx])
        local = {
            "prompt_embeds": emb["prompt_embeds"],
            "pooled": emb["pooled"],
            "negative_prompt_embeds": np.repeat(negative["prompt_embeds"], local_b, axis=0),
            "negative_pooled": np.repeat(negative["pooled"], local_b, axis=0),
        }
        if config.distill.start_points == "interpolate":
            local["x0"] = world.x0(idx)
        place = jax.make_array_from_process_local_data
        return {k: place(graphs.batch_sharding, np.asarray(v)) for k, v in local.items()}

    # Fixed evaluation prompts and noise: the grid shows the same samples at every evaluation.
    eval_prompts = list(world.eval_prompts if world.eval_prompts is not None else config.eval.prompts)
    bounds = window_boundaries(config.distill.num_segments, config.distill.schedule, config.distill.shift)
    sampler = make_sampler(graphs, bounds, world.num_train_timesteps)
    eval_inputs = None
    if eval_prompts:
        e = world.encode(eval_prompts)
        noise = jax.random.normal(jax.random.PRNGKey(int(config.eval.seed)), (len(eval_prompts), *latent_shape))
        rep = parallel.replicated(mesh)
        eval_inputs = [jax.device_put(np.asarray(v), rep) for v in (noise, e["prompt_embeds"], e["pooled"])]

    # eval.metrics: loaded once, on the process that logs (the scorers' own jitted models on its devices).
    score_eval = None
    if is_main and eval_prompts:
        score_eval = eval_scorer(str(config.eval.metrics), config.eval.weights, config.eval.ref)

    def evaluate(step: int) -> None:
        if eval_inputs is None:
            return
        latents = _host(sampler(student_lora(train_state), frozen["base"], *eval_inputs))
        if is_main:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            images = world.decode(latents)
            grid = save_grid(
                os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                images,
                cols=min(4, len(images)),
                scale=max(1, 256 // max(images.shape[1:3])),
            )
            scores = dict(world.score(images)) if world.score is not None else {}
            if score_eval is not None:
                scores.update(score_eval(images, eval_prompts))
            if writer is not None:
                writer.add_image("eval/samples", grid, step, dataformats="HWC")
                for k, v in scores.items():
                    writer.add_scalar(f"eval/{k}", v, step)
            if scores:
                log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    writer = tracking.make_writers(config, workdir, config_json) if is_main else None

    def save(step: int) -> None:
        ckpt.save(step, train_state, {**meta_base, "data": loader.state()})

    num_steps = int(config.train.num_steps)
    step = int(jax.device_get(train_state["step"]))
    every_ckpt, every_eval = int(config.checkpoint.every_steps), int(config.eval.every_steps)
    log_every, max_bad = max(int(config.train.log_every), 1), int(config.train.max_bad_steps)
    bad_run, last_metrics, window_start, t0 = 0, {}, step, time.perf_counter()
    timed = {"first": None, "start": 0.0, "windows": 0.0}  # throughput after the first (compiling) step
    stopped_by = None
    with (
        _StopSignal() as stop,
        tqdm(total=num_steps, initial=step, disable=not is_main, desc="train", unit="step", dynamic_ncols=True) as bar,
    ):
        while step < num_steps:
            batch = next_batch()
            train_state, metrics = step_fn(train_state, frozen, batch, rng)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            bar.update(1)
            if timed["first"] is None:
                timed["first"], timed["start"] = step, time.perf_counter()
            else:
                timed["windows"] += metrics["windows"]
            bad_run = 0 if metrics["finite"] else bad_run + 1
            if bad_run and is_main:
                log.warning(
                    "step %d: non-finite loss, gradient or updated parameters (%d in a row); the step changed nothing",
                    step,
                    bad_run,
                )
            if max_bad and bad_run >= max_bad:
                raise TrainingAborted(_diverged(ckpt, step, bad_run, f"train.max_bad_steps={max_bad}"))
            last_metrics = metrics
            if writer is not None and (step % log_every == 0 or step == num_steps):
                rate = (step - window_start) / max(time.perf_counter() - t0, 1e-9)
                window_start, t0 = step, time.perf_counter()
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/steps_per_s", rate, step)
                writer.add_scalar("train/nonfinite_total", float(jax.device_get(train_state["nonfinite"])), step)
                bar.set_postfix(
                    {k: f"{metrics[k]:.4g}" for k in ("loss_dist", "loss_adv", "loss_fm", "loss_disc") if k in metrics}
                )
            if every_ckpt and step % every_ckpt == 0 and step < num_steps and not bad_run:
                save(step)
            if every_eval and step % every_eval == 0 and step < num_steps:
                evaluate(step)
            if _stop_everywhere(stop.signum is not None):
                stopped_by = stop.signum or signal.SIGTERM
                break
        timed["end"] = time.perf_counter()
        # After a non-finite step the state is the last finite step's, so it is saved under no later label: a
        # stopped run resumes from its last good checkpoint, a finished one failed.
        if not bad_run:
            save(step)
        elif stopped_by is None:
            raise TrainingAborted(_diverged(ckpt, step, bad_run, f"the run's last steps, train.num_steps={num_steps}"))
        ckpt.wait()
        newest = ckpt.latest_step()
        ckpt.close()
    if stopped_by is not None:
        if is_main:
            log.warning(
                "stopped by %s at step %d; %s in %s: rerun the same command to resume",
                signal.Signals(stopped_by).name,
                step,
                f"{bad_run} non-finite last steps not saved, the newest checkpoint is step {newest}"
                if bad_run
                else "checkpoint saved",
                ckpt.directory,
            )
    else:
        evaluate(step)
        if world.finish is not None:
            seconds = timed["end"] - timed["start"] if timed["first"] is not None else 0.0
            stats = {"steps": step, "seconds": seconds, "windows_per_s": timed["windows"] / max(seconds, 1e-9)}
            student = nnx.merge(graphs.student, student_lora(train_state), frozen["base"])
            world.finish(config, workdir, set_lora_enabled(student, True), stats)
    if writer is not None:
        writer.close()
    return {"step": step, "stopped": stopped_by is not None, **last_metrics}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax and absl log every checkpoint step at INFO; keep ours at INFO and theirs at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(cli.DiskFullFilter())  # a full disk: our one line, not orbax's tracebacks
    logging.getLogger("flowsteer_jax").setLevel(logging.INFO)
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    if not workdir:
        raise app.UsageError("--workdir=DIR is required")
    try:
        train(config, workdir)
    except TrainingAborted as e:
        print(f"training aborted: {e}{cli.log_note(e)}", file=sys.stderr)
        sys.exit(3)
    except Exception as e:  # a bad config value, path or file, a full disk: one line, no traceback
        code = cli.report(PROG, e)
        if code is None:
            raise
        sys.exit(code)


def _find_node(node: ConfigDict, target: ConfigDict, prefix: tuple = ()) -> tuple | None:
    """The key path of `target` inside `node` (by identity), or None."""
    if node is target:
        return prefix
    for k, v in node.items():
        found = _find_node(v, target, (*prefix, k)) if isinstance(v, ConfigDict) else None
        if found is not None:
            return found
    return None


def config_file_problem(spec: str) -> str | None:
    """Run the `--config` file `spec` (`path[:args]`) again, and name what its `get_config` cannot set by the full
    key path and the file's line: ml_collections' own error is a traceback that names only the leaf."""
    path, *args = spec.split(":")
    module_spec = importlib.util.spec_from_file_location("_flowsteer_config_check", path)
    if module_spec is None:  # not a Python file: absl's own message says so
        return None
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        module.get_config(*args)
    except Exception as e:  # noqa: BLE001  (whatever the user's file raises is reported in one line)
        frames = list(traceback.walk_tb(e.__traceback__))
        lines = [n for f, n in frames if os.path.abspath(f.f_code.co_filename) == os.path.abspath(path)]
        where = f"{path} line {lines[-1]}" if lines else path
        # ml_collections' ConfigDict.__setitem__(self, key, value) raised: find `self` in the file's configs.
        setter = next((f.f_locals for f, _ in reversed(frames) if isinstance(f.f_locals.get("self"), ConfigDict)), {})
        if "key" not in setter:
            return f"{where}: {type(e).__name__}: {shorten(e)}"
        roots = [v for f, _ in frames for v in f.f_locals.values() if isinstance(v, ConfigDict)]
        prefix = next((p for p in (_find_node(r, setter["self"]) for r in roots) if p is not None), ())
        key = ".".join(map(str, (*prefix, setter["key"])))
        if "value" not in setter or setter["key"] not in setter["self"]:
            return f"{where}: {key}: {shorten(e)}"
        new, old = setter["value"], setter["self"][setter["key"]]
        return f"{where}: {key}={shorten(repr(new))} is {type(new).__name__}, not {type(old).__name__}"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a mistyped or ill-typed `--config.` override reported in one line (exit code 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        problem = config_file_problem(config) if config and "parsing config file" in str(e) else None
        if problem is not None:
            print(f"{PROG}: bad flag: --config={config}: {problem}", file=sys.stderr)
            sys.exit(2)
        msg = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").split()).strip("'\" ")
        typo = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', msg)
        if typo:
            msg = f"unknown config key {typo.group(2)!r} (did you mean {typo.group(1)!r}?)"
        elif isinstance(e, AttributeError | KeyError):
            msg = f"unknown config key {msg!r}"
        print(f"{PROG}: bad flag: {msg}", file=sys.stderr)
        sys.exit(2)


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program: importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, tb/, samples/ (resumed if it has one)")


def run() -> None:
    """The program: `python -m flowsteer_jax.train`, `flowsteer-train`."""
    define_flags()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
