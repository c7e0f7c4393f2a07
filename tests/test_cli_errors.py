"""Bad input, as a user types it: each program exits with code 2 and one line on stderr naming the key or file.

Every case runs the real CLI in a subprocess and must fail before any model loads (a few seconds each: the
imports). `validate(config)` itself is unit-tested at the end.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import types

import jax
import pytest
from absl import flags
from PIL import Image
from transformers import CLIPTokenizer

from conversion.errors import ConversionError, InputError, shorten
from conversion.safetensors_io import Checkpoint, open_checkpoint
from conversion.sd3_transformer import normalize_config
from flowsteer_jax import cli, parallel
from flowsteer_jax.data import DataError, load_prompts
from flowsteer_jax.distill.config import config_latent_shape, default_config, validate, validate_batch, validate_model
from flowsteer_jax.images import save_png
from flowsteer_jax.sample import check_sampling
from flowsteer_jax.text import SD3PromptEncoder
from flowsteer_jax.train import check_workdir, config_file_problem

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
    # Checks that need the transformer's config.json, made before any encoder or transformer loads.
    ("lora_targets_match_nothing", lambda f: _train(f, "--config.lora.targets=('to_qq',)"),
     ["lora.targets ['to_qq'] match no Linear layer", "transformer/config.json"]),
    ("sample_guidance_nan", lambda f: _sample(f, f"--model={f['tiny']}", "--prompt=a cat", "--guidance=nan"),
     ["--guidance=nan: must be a finite number"]),
    ("evaluate_batch_0",
     lambda f: ["flowsteer_jax.evaluate", f"--model={f['tiny']}", f"--prompts={f['base']}/comments.txt",
                "--metrics=clip", f"--weights={f['base']}", "--batch=0"],
     ["--batch=0 must be >= 1"]),
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
    assert lines[0].startswith((f"{argv[0]}: error: ", f"{argv[0]}: bad flag: ")), lines[0]
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


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"seed": 2**32}, "seed=4294967296 must be < 4294967296"),  # PRNGKey(2**32) == PRNGKey(0) without x64
        ({"eval__seed": 2**40}, "eval.seed=1099511627776 must be < 4294967296"),
        ({"data__negative_prompt": None}, "data.negative_prompt=None must be a string"),
        ({"data__max_sequence_length": 513}, "data.max_sequence_length=513 must be < 513"),
        ({"lora__targets": ("to_q", "")}, "lora.targets=('to_q', '') must be a tuple of dotted layer names"),
    ],
)
def test_validate_names_the_key_new_checks(values, fragment):
    message = _bad(**values)
    assert fragment in message, message


def test_long_values_are_cut_in_messages():
    assert shorten("x" * 50) == "x" * 50
    cut = shorten("a" * 100_000)
    assert len(cut) < 250 and "characters left out" in cut
    message = _bad(eval__metrics="m" * 100_000, eval__prompts=("p" * 100_000, 3))
    assert len(message) < 1000 and "eval.metrics=" in message and "eval.prompts=" in message, message


# ---------------------------------------------------------------------------------------------------------------
# validate_model: what the transformer's config.json decides, checked before any model loads


def _model_problem(files, **values) -> str:
    c = default_config()
    c.model.latent_shape = ()
    for key, value in values.items():
        *parents, leaf = key.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = os.path.join(files["tiny"], "transformer", "config.json")
    with open(path) as f:
        tc = json.load(f)
    with pytest.raises(InputError) as info:
        validate_model(c, tc, config_latent_shape(c, tc), path)
    assert path in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"lora__targets": ("to_q", "to_qq")}, "lora.targets ['to_qq'] match no Linear layer of the transformer"),
        ({"disc__num_blocks": 5}, "disc.num_blocks=5 must be <= the transformer's num_layers=2"),
        ({"model__latent_shape": (15, 16, 16)}, "(15, 16, 16) (model.latent_shape): H and W must divide by"),
        ({"model__latent_shape": (16, 16, 4)}, "C must be in_channels=16"),
        ({"model__latent_shape": (64, 64, 16)}, "more than pos_embed_max_size=16 patches"),
    ],
)
def test_validate_model_names_the_key(files, values, fragment):
    message = _model_problem(files, **values)
    assert fragment in message, message


def test_validate_model_accepts_the_tiny_config_and_checks_a_lora_trunk(files):
    c = default_config()
    c.model.latent_shape, c.disc.num_blocks, c.disc.trunk = (), 2, "lora"
    with open(os.path.join(files["tiny"], "transformer", "config.json")) as f:
        tc = json.load(f)
    validate_model(c, tc, config_latent_shape(c, tc))
    # attn2 only in block 1: the student has it, a one-block LoRA trunk of D does not
    c.disc.num_blocks, c.lora.targets, tc["dual_attention_layers"] = 1, ("attn2.to_q",), [1]
    with pytest.raises(InputError, match=r"\['attn2.to_q'\] match no Linear layer of the discriminator's trunk"):
        validate_model(c, tc, config_latent_shape(c, tc))


def test_mesh_that_the_devices_cannot_fill_names_mesh_shape():
    c = default_config()
    c.mesh.shape = (3, 1, 1)
    with pytest.raises(InputError, match=r"mesh.shape=\(3, 1, 1\) does not fit the 1 device"):
        parallel.mesh_from_config(c, jax.devices()[:1])


def test_wrong_typed_transformer_config_field_names_file_and_key():
    with pytest.raises(ConversionError, match=r"cfg.json: num_layers='2'.*positive integers"):
        normalize_config({"num_layers": "2"}, "cfg.json")
    with pytest.raises(ConversionError, match=r"dual_attention_layers='01'"):
        normalize_config({"dual_attention_layers": "01"}, "cfg.json")
    c = default_config()
    c.model.latent_shape = ()  # read from the transformer's config: the first place that reads it names the file
    with pytest.raises(ConversionError, match=r"^t/config.json: num_layers='2'"):
        config_latent_shape(c, {"num_layers": "2"}, "t/config.json")


# ---------------------------------------------------------------------------------------------------------------
# files: corrupt weights, UTF-16 prompts, the workdir, the config file


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(files, tmp_path, damage):
    folder = tmp_path / "transformer"
    shutil.copytree(os.path.join(files["tiny"], "transformer"), folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not safetensors" * 9, "empty": b""}[damage])
    with pytest.raises(ConversionError, match="diffusion_pytorch_model.safetensors: not a readable safetensors"):
        open_checkpoint(str(folder))
    with pytest.raises(ConversionError, match="diffusion_pytorch_model.safetensors: not a readable safetensors"):
        Checkpoint(str(folder), {"k": str(weights)}).load("k")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16"])  # without a BOM, and with one
def test_utf16_prompt_file_is_refused(tmp_path, encoding):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red fox\na blue cat\n".encode(encoding))
    with pytest.raises(DataError, match=r"prompts.txt: line 1 has NUL bytes or a UTF-16 byte-order mark"):
        load_prompts(str(path))


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"--workdir=.*file: exists and is not a folder"):
        check_workdir(str(tmp_path / "file"))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root may write anywhere: simulate the refusal
    with pytest.raises(InputError, match=r"--workdir=.*run: cannot write in the folder \(Permission denied\)"):
        check_workdir(str(tmp_path / "run"))


def test_wrong_typed_value_in_a_config_file_names_the_full_key_and_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from flowsteer_jax.distill.config import default_config\n\n\ndef get_config():\n"
        "    c = default_config()\n    c.optim.lora.update(lr='fast')\n    return c\n"
    )
    assert config_file_problem(str(path)) == f"{path} line 6: optim.lora.lr='fast' is str, not float"
    assert config_file_problem(os.path.join(ROOT, "configs", "tiny.py")) is None


# ---------------------------------------------------------------------------------------------------------------
# flags, a full disk, sampling ranges, the text encoders' truncation warning


def _define_floats(fv):
    flags.DEFINE_float("guidance", 0.0, "", flag_values=fv)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_flags_refuse_nan_and_infinity(capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.parse(_define_floats, [f"--guidance={value}"], prog="prog")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"prog: bad flag: --guidance={value}: must be a finite number")
    assert cli.parse(_define_floats, ["--guidance=7.5"], prog="prog").guidance == 7.5


def test_full_disk_is_one_line_also_when_wrapped(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/run/ckpt/state")

    def wrapped():
        try:
            full()
        except OSError as e:
            raise RuntimeError("orbax: save failed") from e

    for main in (full, wrapped):
        assert cli.run("prog", main) == 2
        err = capsys.readouterr().err.strip()
        assert err == "prog: error: writing /run/ckpt/state: No space left on device; free some space and run again"

    def tensorstore():  # how orbax reports it: a ValueError, no OSError
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/run/x": No space left on device [28]')

    assert cli.run("prog", tensorstore) == 2
    assert capsys.readouterr().err.strip().endswith("No space left on device [28]; free some space and run again")
    logger = logging.getLogger("test_cli_errors.full")
    logger.addFilter(cli.DiskFullFilter())
    with pytest.raises(ValueError) as info:
        tensorstore()
    assert not logger.filter(
        logger.makeRecord("x", logging.ERROR, "f", 1, "failed", (), (ValueError, info.value, None))
    )
    assert logger.filter(logger.makeRecord("x", logging.ERROR, "f", 1, "another failure", (), None))

    def other():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        cli.run("prog", other)  # not a user's input: keeps its traceback


def test_interrupted_png_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "00000.png")
    save_png(path, Image.new("RGB", (4, 4), "red"))
    before = (tmp_path / "00000.png").read_bytes()

    def full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", fp)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError):
        save_png(path, Image.new("RGB", (4, 4), "blue"))
    assert (tmp_path / "00000.png").read_bytes() == before and os.listdir(tmp_path) == ["00000.png"]


@pytest.mark.parametrize(
    "flag_values,fragment",
    [
        ({"steps": 0}, "--steps=0 must be >= 1"),
        ({"batch": 0}, "--batch=0 must be >= 1"),
        ({"seed": -1}, "--seed=-1 must be in [0, 4294967296)"),
        ({"max_sequence_length": 1000}, "--max_sequence_length=1000 must be in [1, 512]"),
        ({"height": 0}, "--height=0 must be >= 1"),
        ({"height": 30}, "--height=30 must be a multiple of 4 (VAE factor 2 x patch size 2) up to 64"),
        ({"width": 68}, "--width=68 must be a multiple of 4"),
    ],
)
def test_sampling_flag_ranges(files, flag_values, fragment):
    args = types.SimpleNamespace(
        **{"steps": 4, "batch": 4, "seed": 0, "max_sequence_length": 256, "height": None, "width": None, **flag_values}
    )
    with pytest.raises(InputError) as info:
        check_sampling(args, [files["tiny"]])
    assert fragment in str(info.value), str(info.value)


def test_long_prompt_truncation_is_reported_once_and_cut(files, caplog):
    encoder = object.__new__(SD3PromptEncoder)  # only the tokenizing half: no encoder weights needed
    encoder._truncated = set()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(files["tiny"], "tokenizer"))
    with caplog.at_level("WARNING", logger="flowsteer_jax.text"):
        for _ in range(3):
            encoder._tokenize(tokenizer, ["a cat " * 1_000], 77, "CLIP (1)")
    warnings = [r.getMessage() for r in caplog.records if r.name == "flowsteer_jax.text"]
    assert len(warnings) == 1 and len(warnings[0]) < 400, warnings
