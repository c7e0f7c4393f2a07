"""The training run end to end on the tiny config: CLI, checkpoints, exact resume after kill -9 and SIGTERM,
refusal of a changed config, the non-finite abort, and a 2-process (gloo, loopback) run equal to 1 process.

Runs go through `python -m flowsteer_jax.train` in subprocesses (a fresh process per run, as users run it),
sharing a persistent compilation cache so only the first run compiles.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flowsteer_jax.evaluation.clip_scores import CLIP_FOLDER
from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline
from tests.eval_weights import save_processor, tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 2


def _load_config(name: str):
    """`configs/<name>.py`'s `get_config()`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    model = str(base / "tiny_sd3")
    write_tiny_pipeline(model, seed=3)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=ROOT,
    )
    return {"base": base, "model": model, "env": env}


def _args(setup, workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "flowsteer_jax.train",
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        f"--workdir={workdir}",
        f"--config.model.path={setup['model']}",
        "--config.data.prompts=" + os.path.join(ROOT, "configs", "prompts", "tiny.txt"),
        f"--config.train.num_steps={STEPS}",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.data.cache_embeddings=True",
        *overrides,
    ]


def _start(setup, workdir, *overrides, env=None):
    return subprocess.Popen(
        _args(setup, workdir, *overrides),
        env=env or setup["env"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(setup, workdir, *overrides, timeout=600) -> subprocess.CompletedProcess:
    """The trainer run to its end in a subprocess, whatever its exit code (stderr captured)."""
    return subprocess.run(
        _args(setup, workdir, *overrides), env=setup["env"], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _run(setup, workdir, *overrides, timeout=600):
    proc = _start(setup, workdir, *overrides)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def _steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _state(workdir, step=None) -> dict:
    """The whole saved train state (LoRA, discriminator, optimizer, counters) as flat numpy arrays."""
    mgr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_handlers={"state": ocp.PyTreeCheckpointHandler()}
    )
    step = mgr.latest_step() if step is None else step
    # As numpy, whatever topology wrote it (a 2-process checkpoint has shardings this process cannot build).
    tree = mgr.item_metadata(step)["state"]
    tree = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy)
    restored = mgr.restore(step, args=ocp.args.Composite(state=args)).state
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def _wait_for_checkpoint(proc, workdir, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _steps(workdir):
            return
        if proc.poll() is not None:
            raise AssertionError("run ended before its first checkpoint: " + proc.stderr.read()[-3000:])
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run; it also scores its eval samples with a (tiny random) CLIP-L: `eval.metrics`."""
    workdir = str(setup["base"] / "reference")
    weights = setup["base"] / "eval_weights"
    tiny_clip(0).save_pretrained(weights / CLIP_FOLDER)
    save_processor(weights / CLIP_FOLDER)
    err = _run(setup, workdir, "--config.eval.metrics=clip", f"--config.eval.weights={weights}")
    with open(os.path.join(workdir, "stderr.txt"), "w") as f:
        f.write(err)
    return workdir


def test_uninterrupted_run_writes_checkpoints_logs_and_samples(reference):
    assert _steps(reference)[-1] == STEPS
    assert len(_steps(reference)) == 3  # checkpoint.keep
    state = _state(reference)
    assert int(state["['step']"]) == STEPS
    lora_b = {k: v for k, v in state.items() if k.startswith("['params']['lora']") and "lora_b" in k}
    # Trained away from the zero init, except the context-pre-only last block's add_q_proj (its output is unused).
    still_zero = sorted(k for k, v in lora_b.items() if not np.abs(v).any())
    assert len(lora_b) > 10 and len(still_zero) == 1 and "add_q_proj" in still_zero[0], still_zero
    assert any(k.startswith("['params']['disc']") for k in state)
    events = [n for n in os.listdir(os.path.join(reference, "tb")) if n.startswith("events.out.tfevents")]
    assert events
    with open(os.path.join(reference, "tb", events[0]), "rb") as f:
        logged = f.read()
    assert b"eval/clip_score" in logged and b"eval/samples" in logged  # eval.metrics next to the grid
    with open(os.path.join(reference, "stderr.txt")) as f:
        assert re.search(rf"step {STEPS} eval: clip_score -?\d", f.read())
    assert any(n.endswith(".png") for n in os.listdir(os.path.join(reference, "samples")))
    assert os.path.isfile(os.path.join(reference, "config.json"))
    assert os.path.isfile(os.path.join(reference, "embeddings", "meta.json"))
    assert not os.path.exists(os.path.join(reference, "train.lock"))  # released at the end
    with open(os.path.join(reference, "train.log")) as f:
        log = f.read()
    assert "start: " in log and re.search(rf"step {STEPS} eval: clip_score", log) and log.rstrip().endswith("done")


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{len(different)} leaves differ, e.g. {different[:3]}"


def test_kill_9_then_resume_is_bit_identical(setup, reference):
    workdir = str(setup["base"] / "killed")
    proc = _start(setup, workdir)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps(workdir)
    assert killed_at and killed_at[-1] < STEPS
    # A half-written (uncommitted) checkpoint must never be picked up.
    junk = os.path.join(workdir, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-123")
    os.makedirs(os.path.join(junk, "state"))
    err = _run(setup, workdir)
    assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {killed_at[-1]}" in err
    assert f"taking over the lock of a dead run (host {socket.gethostname()}, pid {proc.pid}" in err  # kill -9 left it
    _assert_same_state(_state(workdir), _state(reference))


def test_sigterm_saves_exits_cleanly_and_resumes_bit_identical(setup, reference):
    workdir = str(setup["base"] / "sigterm")
    proc = _start(setup, workdir)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    stopped_at = _steps(workdir)[-1]
    assert stopped_at < STEPS
    _run(setup, workdir)
    _assert_same_state(_state(workdir), _state(reference))


def test_mistyped_key_is_an_error_naming_it(setup, tmp_path):
    proc = subprocess.run(
        _args(setup, str(tmp_path), "--config.train.num_step=3"),
        env=setup["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "unknown config key 'num_step' (did you mean 'num_steps'?)" in proc.stderr


def test_resume_refuses_a_changed_model_or_shapes(setup, reference):
    proc = subprocess.run(
        _args(setup, reference, "--config.lora.rank=2"),
        env=setup["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "made by a different run" in proc.stderr and "lora.rank: 4 -> 2" in proc.stderr


def _copy_run(reference, workdir) -> str:
    import shutil

    shutil.copytree(reference, workdir)
    return str(workdir)


def _refused(setup, workdir, *overrides) -> str:
    proc = subprocess.run(
        _args(setup, workdir, *overrides), env=setup["env"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "flowsteer_jax.train: error:" in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_one_run_per_workdir(setup, reference, tmp_path):
    """Issue #24: two trainings in one workdir both ran, the later overwriting the earlier's checkpoints and
    config.json. Now the second gets one line naming the lock's holder (here a live process on this host), exit 2,
    and the workdir is untouched."""
    import json

    from tests.test_export import tree_hashes

    workdir = _copy_run(reference, tmp_path / "run")
    lock = os.path.join(workdir, "train.lock")
    with open(lock, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00"}, f)
    before = tree_hashes(workdir)
    err = _refused(setup, workdir, f"--config.train.num_steps={STEPS + 2}")
    assert (
        f"--workdir={workdir} is in use by another training run (host {socket.gethostname()}, pid {os.getpid()}" in err
    )
    assert tree_hashes(workdir) == before


def test_resume_refuses_other_base_weights_with_the_same_config(setup, reference, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    model = str(tmp_path / "other_sd3")
    shutil.copytree(setup["model"], model)
    folder = os.path.join(model, "transformer")
    path = os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[0])
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + np.asarray(0.01, tensors[key].dtype)  # config.json untouched
    save_file(tensors, path)
    workdir = _copy_run(reference, tmp_path / "run")
    err = _refused(setup, workdir, f"--config.model.path={model}")
    assert "made by a different run" in err and "base weights: checkpoint used" in err
    assert "the same config.json with other weights" in err


def test_resume_refuses_a_changed_setting_unless_allowed(setup, reference, tmp_path):
    workdir = _copy_run(reference, tmp_path / "run")
    err = _refused(setup, workdir, "--config.optim.lora.lr=5e-4", "--config.seed=1")
    assert "made by a different run" in err and "optim.lora.lr: 0.001 -> 0.0005" in err and "seed: 0 -> 1" in err
    assert "checkpoint.allow_changes" in err
    # Allowed on purpose: resumes, with a warning naming the change; train.num_steps may always change.
    err = _run(
        setup,
        workdir,
        "--config.optim.lora.lr=5e-4",
        '--config.checkpoint.allow_changes=("optim.lora.lr",)',
        f"--config.train.num_steps={STEPS + 1}",
    )
    assert f"at step {STEPS}" in err and "allowed change (checkpoint.allow_changes): optim.lora.lr" in err
    assert _steps(workdir)[-1] == STEPS + 1


def test_resume_checks_prompt_texts_and_text_encoders_by_content_not_path(setup, reference, tmp_path):
    import json
    import shutil

    workdir = _copy_run(reference, tmp_path / "run")
    with open(os.path.join(ROOT, "configs", "prompts", "tiny.txt")) as f:
        text = f.read()
    other = tmp_path / "other.txt"
    other.write_text("".join(f"another prompt {i}\n" for i in range(50)))
    no_t5 = str(tmp_path / "no_t5")
    shutil.copytree(setup["model"], no_t5)
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(os.path.join(no_t5, name))
    index = os.path.join(no_t5, "model_index.json")
    with open(index) as f:
        entries = json.load(f)
    with open(index, "w") as f:
        json.dump({**entries, "text_encoder_3": [None, None], "tokenizer_3": [None, None]}, f)
    err = _refused(setup, workdir, f"--config.data.prompts={other}", f"--config.model.path={no_t5}")
    assert "prompts: checkpoint trained on 8 prompts" in err and "this run has 50" in err
    assert "components.text_encoder_3: fingerprint" in err and "-> None" in err
    assert "components.tokenizer_3" in err and "data.prompts" not in err
    # The same prompts and pipeline at other paths are the same run; without the cache, the same steps too.
    same = tmp_path / "same.txt"
    same.write_text(text)
    moved = shutil.copytree(setup["model"], tmp_path / "moved")
    err = _run(
        setup,
        workdir,
        f"--config.data.prompts={same}",
        f"--config.model.path={moved}",
        "--config.data.cache_embeddings=False",
        f"--config.checkpoint.resume_step={STEPS - EVERY}",
    )
    assert f"at step {STEPS - EVERY}" in err and "base model moved" in err
    _assert_same_state(_state(workdir), _state(reference))


def test_unreadable_newest_checkpoint_is_refused_and_an_older_step_resumes(setup, reference, tmp_path):
    workdir = _copy_run(reference, tmp_path / "run")
    garbage = b"not an ocdbt manifest" * 10
    bad = os.path.join(workdir, "checkpoints", str(STEPS), "state", "manifest.ocdbt")
    with open(bad, "wb") as f:
        f.write(garbage)
    err = _refused(setup, workdir)
    assert f"cannot read checkpoint step {STEPS} in {os.path.join(workdir, 'checkpoints')}" in err
    assert "--config.checkpoint.resume_step=N" in err and f"steps on disk: {_steps(workdir)}" in err
    assert "nothing was deleted" in err
    err = _run(setup, workdir, f"--config.checkpoint.resume_step={STEPS - EVERY}")
    assert f"at step {STEPS - EVERY}" in err
    # The unreadable step was moved aside, intact, not deleted or overwritten; the run redid it bit for bit.
    with open(os.path.join(workdir, "checkpoints_set_aside", str(STEPS), "state", "manifest.ocdbt"), "rb") as f:
        assert f.read() == garbage
    assert _steps(workdir)[-1] == STEPS
    _assert_same_state(_state(workdir), _state(reference))


def test_non_finite_steps_abort_and_keep_the_last_good_checkpoint(setup, tmp_path):
    workdir = str(tmp_path / "nan")
    proc = _finish(
        setup,
        workdir,
        "--config.optim.lora.lr=1e38",
        "--config.train.max_bad_steps=3",
        "--config.checkpoint.every_steps=1",
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 non-finite steps in a row (train.max_bad_steps=3)" in proc.stderr
    steps = _steps(workdir)
    assert steps and steps[-1] < STEPS
    assert "the last good checkpoint is step" in proc.stderr and f"step {steps[-1]} in" in proc.stderr


def test_a_run_ending_in_non_finite_updated_weights_fails_and_saves_nothing(setup, tmp_path):
    """lr = 1e39 (inf in float32): step 1's loss and gradients are finite, its updated LoRA weights are not, so
    it changes nothing, and neither do the 2 after it (fewer than train.max_bad_steps = 20). The run fails, and
    no checkpoint is labelled with a step whose state it does not hold."""
    workdir = str(tmp_path / "inf")
    proc = _finish(
        setup,
        workdir,
        "--config.optim.lora.lr=1e39",
        "--config.train.num_steps=3",
        "--config.checkpoint.every_steps=1",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    want = "3 non-finite steps in a row (the run's last steps, train.num_steps=3) at step 3, none saved; no checkpoint"
    assert want in proc.stderr and _steps(workdir) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(setup, workdir, *overrides):
    port = _free_port()
    procs = [
        _start(
            setup,
            workdir,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            "--config.data.cache_embeddings=False",  # the per-step encoding path (the reference used the cache)
            f"--config.distributed.process_id={i}",
            *overrides,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs


def test_two_processes_equal_one_and_resume_together(setup, reference):
    workdir = str(setup["base"] / "two_procs")
    _run_two_processes(setup, workdir, f"--config.train.num_steps={STEPS // 2}")
    assert _steps(workdir)[-1] == STEPS // 2
    errs = _run_two_processes(setup, workdir)
    assert f"at step {STEPS // 2}" in errs[0]
    ours, ref = _state(workdir), _state(reference)
    assert ours.keys() == ref.keys()
    # Sharded reductions round differently; Adam turns tiny gradient differences into relative ones of ~1e-4 on
    # the discriminator (measured 3.6e-5 on LoRA, 1.9e-4 on D, of each leaf's largest entry, after 12 steps).
    for k in ours:
        a, b = ours[k].astype(np.float64), ref[k].astype(np.float64)
        tol = 1e-4 if k.startswith("['params']['lora']") else 1e-3
        assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-30), k


def test_trained_student_exports_to_diffusers(reference, tmp_path):
    """Issue 8's round trip on a real training run: diffusers loads the exported LoRA (and the fused transformer)
    and its forward equals our student's."""
    from tests.test_export import check_export

    errors = check_export(reference, str(tmp_path / "export"))
    assert errors["adapter"] <= 1e-4 and errors["fused"] <= 1e-4, errors


def test_config_files_load():
    """Every configs/*.py builds; SD3.5-Large is SD3-Medium's paper settings with its four scale changes."""
    files = os.listdir(os.path.join(ROOT, "configs"))
    names = sorted(n[:-3] for n in files if n.endswith(".py") and not n.startswith("_"))  # not __init__.py
    assert {"digits", "sd3_5_large", "sd3_medium", "tiny"} <= set(names)
    configs = {n: _load_config(n) for n in names}
    medium, large = configs["sd3_medium"].to_dict(), configs["sd3_5_large"].to_dict()
    assert (large["disc"]["num_blocks"], large["model"]["remat_policy"]) == (19, "full")
    assert (tuple(large["mesh"]["shape"]), large["train"]["batch_size"]) == ((-1, 8, 1), 16)
    for section in ("disc", "model", "mesh", "train"):
        medium.pop(section), large.pop(section)
    assert medium == large


def test_sd3_world_takes_the_timestep_scale_from_the_scheduler(setup, tmp_path):
    """The SD3 world reads `num_train_timesteps` from the folder's scheduler config (the trainer's sigma ->
    timestep scale), not a constant."""
    import json
    import shutil

    from flowsteer_jax.worlds import make_world

    model = str(tmp_path / "model")
    shutil.copytree(setup["model"], model)
    path = os.path.join(model, "scheduler", "scheduler_config.json")
    with open(path) as f:
        scheduler = json.load(f)
    config = _load_config("tiny")
    config.model.path, config.data.prompts = model, os.path.join(ROOT, "configs", "prompts", "tiny.txt")
    assert make_world(config, str(tmp_path)).num_train_timesteps == scheduler.get("num_train_timesteps", 1000)
    with open(path, "w") as f:
        json.dump({**scheduler, "num_train_timesteps": 500}, f)
    assert make_world(config, str(tmp_path)).num_train_timesteps == 500


FAKE_WANDB = '''"""A stand-in for the wandb package: init, log and finish calls as JSON lines in $FAKE_WANDB_LOG."""
import json
import os


def _write(**record):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")


class Image:
    def __init__(self, data):
        self.shape = list(data.shape)


class _Run:
    def log(self, data, step=None):
        shown = {k: v if isinstance(v, float) else {"image": v.shape} for k, v in data.items()}
        _write(call="log", step=step, data=shown)

    def finish(self):
        _write(call="finish")


def init(**kwargs):
    _write(call="init", config_keys=sorted(kwargs.pop("config")), **kwargs)
    return _Run()
'''


def test_trains_from_parquet_shards_with_ema_and_wandb(setup, tmp_path):
    """Prompts from a glob of parquet shards with a custom column, an EMA of the LoRA (checkpointed, what the export
    reads) and the W&B sink (a fake wandb module, offline), in one run."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conversion.training_checkpoint import read_lora
    from flowsteer_jax.data import load_prompts

    prompts = load_prompts(os.path.join(ROOT, "configs", "prompts", "tiny.txt"))
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(prompts) // 2
    for i, part in enumerate((prompts[:half], prompts[half:])):
        pq.write_table(pa.table({"caption": part, "n": list(range(len(part)))}), shards / f"train-{i}.parquet")
    fake = tmp_path / "fake_site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)
    env = dict(
        setup["env"], PYTHONPATH=f"{ROOT}{os.pathsep}{fake.parent}", FAKE_WANDB_LOG=str(tmp_path / "wandb.jsonl")
    )
    env["WANDB_MODE"] = "offline"
    workdir = str(tmp_path / "run")
    proc = _start(
        setup,
        workdir,
        f"--config.data.prompts={shards}/train-*.parquet",
        "--config.data.text_column=caption",
        "--config.ema.decay=0.5",
        "--config.log.wandb=True",
        "--config.train.num_steps=4",
        env=env,
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "the embedding cache of" in err  # its size, stated before it is built

    with open(tmp_path / "wandb.jsonl") as f:
        calls = [json.loads(line) for line in f]
    assert calls[0]["call"] == "init" and calls[0]["name"] == "run" and "ema" in calls[0]["config_keys"]
    logged = [c for c in calls if c["call"] == "log"]
    assert {c["step"] for c in logged if "train/loss" in c["data"]} == {1, 2, 3, 4}
    assert any(c["data"].get("eval/samples", {}).get("image") for c in logged) and calls[-1]["call"] == "finish"

    state = _state(workdir)
    ema = {k: v for k, v in state.items() if k.startswith("['ema']")}
    assert ema and len(ema) == len([k for k in state if k.startswith("['params']['lora']")])
    flat, _ = read_lora(workdir)
    raw, _ = read_lora(workdir, ema=False)
    assert any(not np.array_equal(flat[k], raw[k]) for k in flat)  # the export reads the EMA, not the weights
    saved = {k.removesuffix("['value']"): v for k, v in ema.items()}  # nnx.State leaves: {"value": array}
    for key, value in flat.items():
        np.testing.assert_array_equal(saved["['ema']" + "".join(f"['{p}']" for p in key.split("."))], value)
