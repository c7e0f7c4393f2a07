"""Where programs may write (`flowsteer_jax/outputs.py`, issue #24): the containment rule on folders laid out as
models, training workdirs, checkpoints and outputs; manifests and `--overwrite`; stale temporaries; the workdir
lock; the log file a failure names (`cli.log_to`). Plain files only (no model): the programs' own probes are in
tests/test_export.py (export, sample) and tests/test_train.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conversion.errors import InputError
from flowsteer_jax import cli, outputs
from flowsteer_jax.outputs import MANIFEST, check_output, check_workdir, prepare_output, protected_kind

EXPORT, SAMPLE, EVALUATE = "flowsteer_jax.export", "flowsteer_jax.sample", "flowsteer_jax.evaluate"


def touch(path, text: str = "x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def tree(tmp_path):
    """A base model, a training workdir (checkpoint step 5) and another run, laid out as the programs write them."""
    base = tmp_path / "sd3"
    touch(base / "model_index.json", "{}")
    for comp in ("transformer", "vae"):
        touch(base / comp / "config.json", "{}")
        touch(base / comp / "diffusion_pytorch_model.safetensors")
    touch(base / "scheduler" / "scheduler_config.json", "{}")
    run = tmp_path / "run"
    for item in ("state", "meta"):
        touch(run / "checkpoints" / "5" / item / "commit_success.txt")
    touch(run / "checkpoints" / "5" / outputs.STEP_METADATA, "{}")
    touch(run / "config.json", "{}")
    os.makedirs(run / "tb")
    other = tmp_path / "other_run"
    touch(other / "checkpoints" / "3" / outputs.STEP_METADATA, "{}")
    return {"root": tmp_path, "base": base, "run": run, "other": other}


def snapshot(folder) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), folder)] = f.read().hex()
    return out


def refused(out, program=EXPORT, overwrite=True, inputs=(), match=None) -> str:
    with pytest.raises(InputError) as e:
        check_output(str(out), program, overwrite=overwrite, inputs=inputs)
    msg = str(e.value)
    assert msg.startswith(f"--out={out} ") and "\n" not in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_layouts_are_recognised(tree):
    base, run = tree["base"], tree["run"]
    assert protected_kind(str(base)) == "a diffusers model folder"
    assert protected_kind(str(base / "vae")) == "a model folder (config.json and weights)"
    assert protected_kind(str(run)) == "a training workdir"
    assert protected_kind(str(run / "checkpoints" / "5")) == "a training checkpoint"
    assert protected_kind(str(run / "checkpoints")) == "a folder of training checkpoints"
    assert protected_kind(str(base / "scheduler")) is None and protected_kind(str(run / "tb")) is None
    touch(tree["root"] / "done" / MANIFEST, json.dumps({"program": SAMPLE, "files": [MANIFEST]}))
    assert protected_kind(str(tree["root"] / "done")) == f"the output of {SAMPLE}"


def test_never_into_a_protected_folder_at_any_depth(tree, monkeypatch):
    """The issue's probes (an --out inside a workdir, a checkpoint or the base; another run) and our own: a new
    step folder, a symlink into the base, `--out=.` inside a workdir, a parent of the base."""
    base, run, root = tree["base"], tree["run"], tree["root"]
    before = {k: snapshot(tree[k]) for k in ("base", "run", "other")}
    for program in (EXPORT, SAMPLE, EVALUATE):
        refused(run / "checkpoints", program, match="is a folder of training checkpoints")
        refused(base / "vae", program, match="is a model folder")
        refused(tree["other"], program, match="is a training workdir")
        refused(
            run / "checkpoints" / "99", program, overwrite=False, match="is inside a folder of training checkpoints"
        )
        refused(run / "samples" / "new", program, overwrite=False, match=f"is inside a training workdir ({run})")
        refused(base / "vae" / "sub", program, match="is inside a model folder")
        refused(root, program, match="holds a ")
    os.symlink(base / "transformer", root / "link")
    refused(root / "link", match="is a model folder")
    refused(root / "link" / "new", overwrite=False, match="is inside a model folder")
    monkeypatch.chdir(run / "tb")
    refused(".", SAMPLE, overwrite=False, match=f"is inside a training workdir ({run})")
    assert {k: snapshot(tree[k]) for k in ("base", "run", "other")} == before


def test_never_over_an_input(tmp_path):
    """An input that no layout marks (weights under any name, a hub cache's blob folder): named, refused."""
    blobs = tmp_path / "hub" / "blobs"
    touch(blobs / "abc123")
    snap = tmp_path / "hub" / "snap"
    os.makedirs(snap)
    os.symlink(blobs / "abc123", snap / "weights.safetensors")
    msg = refused(blobs / "new", overwrite=False, inputs=[str(snap)], match="is inside the input")
    assert "never writes over what it reads" in msg
    refused(snap, overwrite=False, inputs=[str(snap)], match="is the input")


def test_overwrite_replaces_only_its_own_earlier_output(tree):
    root = tree["root"]
    mine = root / "mine"  # the user's own folder: never replaced
    touch(mine / "notes.txt")
    refused(mine, match=f"not an output of {EXPORT} (no {MANIFEST})")
    with prepare_output(str(root / "samples"), SAMPLE) as out:  # another program's output
        touch(os.path.join(out.dir, "00000.png"))
        out.commit()
    refused(root / "samples", EXPORT, match=f"is the output of {SAMPLE}")
    assert sorted(os.listdir(root / "samples")) == ["00000.png", MANIFEST]
    with pytest.raises(InputError, match="pass --overwrite"):
        check_output(str(root / "samples"), SAMPLE, overwrite=False)
    touch(root / "samples" / "keep_me.txt")  # a file the user added to an earlier output
    refused(root / "samples", SAMPLE, match="did not write (keep_me.txt)")
    os.remove(root / "samples" / "keep_me.txt")
    inputs = [str(root / "samples" / "00000.png")]  # this run reads a file of the output it would replace
    refused(root / "samples", SAMPLE, inputs=inputs, match="holds the input")
    with prepare_output(str(root / "samples"), SAMPLE, overwrite=True) as out:
        touch(os.path.join(out.dir, "00001.png"))
        out.commit()
    assert sorted(os.listdir(root / "samples")) == ["00001.png", MANIFEST]  # replaced whole
    assert not [n for n in os.listdir(root) if ".tmp-" in n or ".old-" in n]


def test_an_evaluate_output_accumulates_in_place(tmp_path):
    out = prepare_output(str(tmp_path / "eval"), EVALUATE, staged=False)
    assert out.dir == out.path == os.path.realpath(tmp_path / "eval")
    touch(tmp_path / "eval" / "row" / "00000.png")
    touch(tmp_path / "eval" / "results.json", "{}")
    assert check_output(str(tmp_path / "eval"), EVALUATE, overwrite=False) == out.path  # again, no --overwrite
    refused(tmp_path / "eval", SAMPLE, match=f"is the output of {EVALUATE}")
    refused(tmp_path / "eval" / "row", EVALUATE, overwrite=False, match=f"is inside the output of {EVALUATE}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    """The issue's probe: a killed export left `<out>.tmp-...` behind forever. Now the next run on that --out
    removes a dead process's temporaries on this host, and puts back an output a killed replace moved aside."""
    out = tmp_path / "export"
    dead, host = _dead_pid(), outputs.host()
    touch(tmp_path / f"export.tmp-{host}-{dead}" / "half.safetensors")  # a killed export's staging folder
    live = touch(tmp_path / f"export.tmp-{host}-{os.getppid()}" / "x")  # a live process's: kept
    remote = touch(tmp_path / f"export.tmp-otherhost-{dead}" / "x")  # another host's: cannot tell, kept
    with prepare_output(str(out), EXPORT) as output:
        output.commit()
    left = {n for n in os.listdir(tmp_path)}
    assert left == {"export", f"export.tmp-{host}-{os.getppid()}", f"export.tmp-otherhost-{dead}"}, left
    assert os.path.isfile(live) and os.path.isfile(remote)
    # An earlier output moved aside by a killed replace, with nothing in its place: put back, then protected.
    os.rename(out, tmp_path / f"export.old-{host}-{dead}")
    with pytest.raises(InputError, match="holds an earlier output of flowsteer_jax.export; pass --overwrite"):
        prepare_output(str(out), EXPORT)
    assert sorted(os.listdir(out)) == [MANIFEST]
    assert not os.path.exists(tmp_path / f"export.old-{host}-{dead}")


def test_a_failed_staged_run_leaves_only_its_log(tmp_path):
    out = tmp_path / "samples"
    os.makedirs(out)  # an empty folder, as a user may create it first
    with pytest.raises(InputError) as e:
        with prepare_output(str(out), SAMPLE) as output, cli.log_to(output.log_file):
            touch(os.path.join(output.dir, "00000.png"))
            logging.getLogger("flowsteer_jax.sample").warning("something to keep")
            raise InputError("--lora=x: not a LoRA")
    log = os.path.join(os.path.realpath(out), "sample.log")
    assert e.value.log_file == log and cli.log_note(e.value) == f" (log: {log})"
    assert sorted(os.listdir(out)) == [MANIFEST, "sample.log"]
    with open(log) as f:
        text = f.read()
    assert "start:" in text and "something to keep" in text and "failed: --lora=x: not a LoRA" in text
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    # the next run needs no --overwrite (nothing but a log there), and keeps that log's history
    with prepare_output(str(out), SAMPLE) as output, cli.log_to(output.log_file):
        touch(os.path.join(output.dir, "00000.png"))
        output.commit()
    with open(log) as f:
        text = f.read()
    assert text.count("start:") == 2 and "failed:" in text and text.rstrip().endswith("done")


def test_cli_error_names_the_log(tmp_path, capsys):
    def main():
        with cli.log_to(str(tmp_path / "x.log")):
            raise InputError("bad\nvalue")

    assert cli.run("prog", main) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"prog: error: bad value (log: {tmp_path / 'x.log'})"]
    with pytest.raises(ZeroDivisionError) as e:  # a bug: its traceback in the log, and on the exception
        with cli.log_to(str(tmp_path / "x.log")):
            1 / 0  # noqa: B018
    assert e.value.log_file == str(tmp_path / "x.log")
    assert "Traceback" in (tmp_path / "x.log").read_text()


def test_workdir_rules(tree, tmp_path):
    base, run = tree["base"], tree["run"]
    assert check_workdir(str(run)) == os.path.realpath(run)  # resumed
    assert check_workdir(str(tmp_path / "new")) == os.path.realpath(tmp_path / "new")
    assert check_workdir(str(run / "ablation" / "k1")) == os.path.realpath(run / "ablation" / "k1")  # digits.ablate
    cases = {
        str(base): "is a diffusers model folder",
        str(base / "transformer" / "run"): "is inside a model folder",
        str(run / "checkpoints"): "is a folder of training checkpoints",
        str(run / "checkpoints" / "5" / "x"): "is inside a training checkpoint",
        str(tmp_path): "is a non-empty folder that is not a training workdir",
    }
    for workdir, why in cases.items():
        with pytest.raises(InputError, match="never writes there") as e:
            check_workdir(workdir)
        assert str(e.value).startswith(f"--workdir={workdir} ") and why in str(e.value), str(e.value)


def test_workdir_lock(tmp_path, caplog):
    workdir = str(tmp_path)
    path = outputs.lock_workdir(workdir)
    holder = json.load(open(path))
    assert holder["host"] == outputs.host() and holder["pid"] == os.getpid() and holder["started"]
    assert protected_kind(workdir) == "a training workdir"
    with pytest.raises(InputError, match=rf"in use by another training run \(host .*, pid {os.getpid()}, started "):
        outputs.lock_workdir(workdir)  # a live holder (here: ourselves)
    outputs.unlock_workdir(path)
    assert not os.path.exists(path)
    for holder, why in (
        ({"host": "elsewhere", "pid": os.getpid(), "started": "t"}, "host elsewhere"),  # liveness unknown there
        ({"host": outputs.host(), "pid": os.getppid(), "started": "t"}, f"pid {os.getppid()}"),  # another live one
    ):
        touch(path, json.dumps(holder))
        with pytest.raises(InputError, match="in use by another training run") as e:
            outputs.lock_workdir(workdir)
        assert why in str(e.value) and path in str(e.value)
        outputs.unlock_workdir(path)  # not ours: left alone
        assert json.load(open(path)) == holder
    touch(path, "")  # unreadable
    with pytest.raises(InputError, match="unreadable; if no run uses this workdir, delete it"):
        outputs.lock_workdir(workdir)
    dead = _dead_pid()
    touch(path, json.dumps({"host": outputs.host(), "pid": dead, "started": "t"}))
    with caplog.at_level(logging.WARNING, "flowsteer_jax.outputs"):
        assert outputs.lock_workdir(workdir) == path  # a dead run's lock: taken over, with a warning
    assert json.load(open(path))["pid"] == os.getpid()
    assert any(f"pid {dead}" in r.getMessage() and "dead run" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == [outputs.LOCK]
    outputs.unlock_workdir(path)


def test_distributed_settings_that_cannot_take_effect():
    from flowsteer_jax.distill.config import default_config, validate

    for settings, want in (
        (dict(num_processes=2, process_id=1), "needs distributed.coordinator_address"),
        (dict(num_processes=2, auto=True), "read from the environment with distributed.auto"),
        (dict(coordinator_address="h:1", auto=True), "exclusive"),
    ):
        c = default_config()
        c.distributed.update(settings)
        with pytest.raises(InputError, match=want):
            validate(c)
    c = default_config()
    c.distributed.update(coordinator_address="h:1", num_processes=2, process_id=1)
    validate(c)
