"""Bad input, as a user types it: each program exits with code 2 and one line on stderr naming the key or file.

Every case runs the real CLI in a subprocess and must fail before any model loads (a few seconds each: the
imports). `validate(config)` itself is unit-tested at the end.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conversion.errors import InputError
from flowsteer_jax.distill.config import default_config, validate, validate_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline

    base = tmp_path_factory.mktemp("cli_errors")
    tiny = str(base / "tiny")
    write_tiny_pipeline(tiny, with_t5=False)
    shutil.copytree(tiny, str(base / "novae"))
    shutil.rmtree(str(base / "novae" / "vae"))
    (base / "comments.txt").write_text("# a comment\n\n   # an indented one\n")
    return {"base": str(base), "tiny": tiny}


def _train(files, *overrides):
    return [
        "flowsteer_jax.train",
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        f"--config.model.path={files['tiny']}",
        "--config.data.prompts=" + os.path.join(ROOT, "configs", "prompts", "tiny.txt"),
        *overrides,
    ]


def _sample(files, *flags):
    return ["flowsteer_jax.sample", "--steps=1", "--batch=1", *flags]


# (id, argv after `python -m` (a function of the fixture's files), what stderr's one line must contain)
CASES = [
    ("cfg_min>cfg_max", lambda f: _train(f, "--config.distill.cfg_min=5", "--config.distill.cfg_max=3"),
     ["distill.cfg_min=5 > distill.cfg_max=3"]),
    ("num_segments=0", lambda f: _train(f, "--config.distill.num_segments=0"), ["distill.num_segments=0", ">= 1"]),
    ("teacher_steps<num_segments", lambda f: _train(f, "--config.distill.teacher_steps=2"),
     ["distill.teacher_steps=2", "distill.num_segments=4"]),
    ("schedule", lambda f: _train(f, "--config.distill.schedule=foo"),
     ["distill.schedule='foo' not in ('rectified', 'diffusers')"]),
    ("attention", lambda f: _train(f, "--config.model.attention=foo"), ["model.attention='foo'", "'splash'"]),
    ("remat", lambda f: _train(f, "--config.model.remat_policy=foo"), ["model.remat_policy='foo'", "'dots'"]),
    ("dtype", lambda f: _train(f, "--config.model.dtype=foo"), ["model.dtype='foo'", "'bfloat16'"]),
    ("batch1_with_discriminator", lambda f: _train(f, "--config.train.batch_size=1"),
     ["train.batch_size=1", "loss.lambda_adv"]),
    ("prompts_only_comments", lambda f: _train(f, f"--config.data.prompts={f['base']}/comments.txt"),
     ["data.prompts: ", "comments.txt", "no prompts"]),
    ("prompts_missing", lambda f: _train(f, f"--config.data.prompts={f['base']}/missing.txt"),
     ["data.prompts: ", "missing.txt", "no such file"]),
    ("model_path_missing", lambda f: _train(f, f"--config.model.path={f['base']}/nothere"),
     ["model.path=", "nothere", "no such folder"]),
    ("model_path_without_vae", lambda f: _train(f, f"--config.model.path={f['base']}/novae"),
     ["model.path=", "novae", "missing vae/"]),
    ("sample_prompts_missing", lambda f: _sample(f, f"--model={f['tiny']}", "--prompts=missing/path.txt"),
     ["--prompts=missing/path.txt", "no such prompt file", "--prompt="]),
    ("sample_prompts_only_comments",
     lambda f: _sample(f, f"--model={f['tiny']}", f"--prompts={f['base']}/comments.txt"),
     ["--prompts: ", "comments.txt", "no prompts"]),
    ("sample_model_missing", lambda f: _sample(f, f"--model={f['base']}/nothere", "--prompt=a cat"),
     ["--model=", "nothere", "no such folder"]),
    ("sample_model_without_vae", lambda f: _sample(f, f"--model={f['base']}/novae", "--prompts=a cat"),
     ["--model=", "missing vae/"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(files, tmp_path, argv, expected):
    argv = argv(files)
    out = f"--workdir={tmp_path / 'run'}" if argv[0] == "flowsteer_jax.train" else f"--out={tmp_path / 'out'}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", *argv, out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"{argv[0]}: error: "), lines[0]
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not os.path.exists(tmp_path / "out")  # nothing written before the check


# ---------------------------------------------------------------------------------------------------------------
# validate


def _bad(**values) -> str:
    c = default_config()
    for key, value in values.items():
        *parents, leaf = key.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(InputError) as info:
        validate(c)
    return str(info.value)


def test_validate_accepts_every_config_file():
    import importlib.util

    folder = os.path.join(ROOT, "configs")
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_")):
        spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", os.path.join(folder, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        validate(module.get_config())
    validate(default_config())


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"distill__cfg_min": 5.0, "distill__cfg_max": 3.0}, "distill.cfg_min=5 > distill.cfg_max=3"),
        ({"distill__num_segments": 0}, "distill.num_segments=0 must be >= 1"),
        ({"distill__teacher_steps": 3}, "distill.teacher_steps=3 must be >= distill.num_segments=4"),
        ({"distill__schedule": "foo"}, "distill.schedule='foo' not in ('rectified', 'diffusers')"),
        ({"distill__shift": 0.0}, "distill.shift=0.0 must be > 0"),
        ({"distill__start_points": "x"}, "distill.start_points='x' not in ('ota', 'interpolate')"),
        ({"adv__student_states": "x"}, "adv.student_states='x' not in ('one_step', 'rollout')"),
        ({"disc__head": "x"}, "disc.head='x' not in ('conv', 'mlp')"),
        ({"disc__param_dtype": "float64"}, "disc.param_dtype='float64' not in ('float32', 'bfloat16', 'float16')"),
        ({"lora__dtype": "int8"}, "lora.dtype='int8'"),
        ({"lora__rank": 0}, "lora.rank=0 must be >= 1"),
        ({"model__attention": "flash"}, "model.attention='flash' not in ('', 'xla', 'cudnn', 'splash')"),
        ({"model__remat_policy": "x"}, "model.remat_policy='x' not in ('', 'full', 'dots', 'dots_all')"),
        ({"model__dtype": "float8"}, "model.dtype='float8'"),
        ({"model__preset": "sd4"}, "model.preset='sd4'"),
        ({"loss__lambda_adv": -1.0}, "loss.lambda_adv=-1.0 must be >= 0"),
        ({"optim__lora__lr": 0.0}, "optim.lora.lr=0.0 must be > 0"),
        ({"optim__disc__schedule": "linear"}, "optim.disc.schedule='linear' not in ('constant', 'cosine')"),
        ({"optim__disc__b2": 1.0}, "optim.disc.b2=1.0 must be < 1"),
        ({"train__batch_size": 0}, "train.batch_size=0 must be >= 1"),
        ({"train__batch_size": 1}, "train.batch_size=1 with the discriminator on"),
        ({"distributed__process_id": 1}, "distributed.process_id=1 must be < distributed.num_processes=1"),
        ({"mesh__shape": (-1, -1, 1)}, "mesh.shape=(-1, -1, 1)"),
        ({"seed": -1}, "seed=-1 must be >= 0"),
        ({"checkpoint__resume_step": -2}, "checkpoint.resume_step=-2 must be >= -1"),
        ({"checkpoint__allow_changes": ("",)}, "checkpoint.allow_changes=('',) must be a tuple of dotted keys"),
        ({"ema__decay": 1.0}, "ema.decay=1.0 must be < 1 (0 = no EMA)"),
        ({"ema__decay": -0.5}, "ema.decay=-0.5 must be >= 0"),
        ({"ema__start_step": -1}, "ema.start_step=-1 must be >= 0"),
        ({"data__text_column": ""}, "data.text_column='' must name the prompts' column"),
        ({"data__cache_max_gib": 0.0}, "data.cache_max_gib=0.0 must be > 0"),
        ({"log__wandb_project": ""}, "log.wandb_project='' must name a W&B project"),
    ],
)
def test_validate_names_the_key(values, fragment):
    message = _bad(**values)
    assert fragment in message, message


def test_validate_lists_every_problem_and_allows_batch_1_without_discriminator():
    message = _bad(distill__cfg_min=5.0, distill__cfg_max=3.0, distill__schedule="foo", model__dtype="x")
    assert all(k in message for k in ("distill.cfg_min", "distill.schedule", "model.dtype")), message
    c = default_config()
    c.train.batch_size, c.loss.lambda_adv, c.loss.lambda_fm = 1, 0.0, 0.0
    validate(c)


def test_validate_batch():
    c = default_config()
    validate_batch(c, 8, 2)
    with pytest.raises(InputError, match=r"train.batch_size=8 must divide .* \(3\)"):
        validate_batch(c, 3, 1)


def test_wandb_without_the_package_is_one_input_error(monkeypatch):
    """`log.wandb=True` needs the optional wandb package: refused before anything loads, naming the key."""
    import importlib.util

    from conversion.errors import InputError
    from flowsteer_jax import tracking

    c = default_config()
    tracking.check(c)  # off: wandb is never looked for
    c.log.wandb = True
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"log.wandb=True, but the wandb package is not installed"):
        tracking.check(c)
