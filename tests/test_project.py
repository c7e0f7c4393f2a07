"""The project as installed: pins in one agreement, every program's entry point and `--help`, no sys.path edits."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PROJECT = tomllib.load(_f)["project"]
# Every program on the shared absl flag pattern (`flowsteer_jax.cli`), by module.
PROGRAMS = (
    "flowsteer_jax.export",
    "flowsteer_jax.sample",
    "flowsteer_jax.evaluate",
    "flowsteer_jax.digits.ablate",
    "flowsteer_jax.digits.figure",
    "flowsteer_jax.compose.measure",
    "flowsteer_jax.tools.tiny_model",
    "benchmarks.sampling",
    "benchmarks.mmdit_forward",
    "benchmarks.schedule_table",
    "benchmarks.chip_table",
    "benchmarks.load_memory",
    "benchmarks.train_step",
    "benchmarks.device_check",
)


def _requirements(name: str) -> list[str]:
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line]


def test_pins_agree_with_requirements_files():
    assert PROJECT["dependencies"] == _requirements("requirements.txt")
    test = _requirements("requirements-test.txt")
    assert "torch==2.13.0" in test  # installed first, as the local CPU wheel: not an extra
    assert PROJECT["optional-dependencies"]["test"] == [r for r in test if r != "torch==2.13.0"]
    assert PROJECT["optional-dependencies"]["aot"] == _requirements("requirements-aot.txt")


def test_readme_test_command_is_ci():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = [line.strip() for line in f]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci[-1] in readme and ci[-1].endswith("python -m pytest tests"), ci[-1]
    assert "pip install -e ." in ci[-1]


@pytest.mark.parametrize("name", sorted(PROJECT["scripts"]))
def test_script_entry_points_resolve(name):
    module, _, func = PROJECT["scripts"][name].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_no_sys_path_edits():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"sys\.path\.(insert|append)\(")
    offenders = [
        p
        for p in tracked
        if os.path.isfile(os.path.join(ROOT, p)) and pattern.search(open(os.path.join(ROOT, p)).read())
    ]
    assert not offenders


def test_every_program_help_and_bad_flag():
    """`--help` exits 0 listing the flags, an unknown flag exits 2 with one line; in one process, each module's
    parse twice (a FlagValues per call: no clash between programs or calls)."""
    code = (
        "import importlib, sys, contextlib, io\n"
        f"for name in {list(PROGRAMS)!r}:\n"
        "    m = importlib.import_module(name)\n"
        "    for argv, want in ((['--help'], 0), (['--nope=1'], 2), (['--help'], 0)):\n"
        "        out, err = io.StringIO(), io.StringIO()\n"
        "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "            try:\n"
        "                m.main(argv)\n"
        "                rc = 0\n"
        "            except SystemExit as e:\n"
        "                rc = e.code\n"
        "        assert rc == want, (name, argv, rc, err.getvalue())\n"
        "        if want == 0:\n"
        "            assert 'flags:' in out.getvalue(), (name, out.getvalue())\n"
        "        else:\n"
        "            lines = err.getvalue().strip().splitlines()\n"
        "            assert len(lines) == 1 and 'bad flag' in lines[0] and 'nope' in lines[0], (name, lines)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
