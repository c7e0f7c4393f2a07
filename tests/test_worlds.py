"""`worlds`: registration by name or module path, clear errors, and no import cycle with the trainer."""

from __future__ import annotations

import subprocess
import sys

import ml_collections
import pytest

from flowsteer_jax import worlds

MY_WORLD = """
import numpy as np
from flowsteer_jax.worlds import World

def make_world(config, workdir):
    return World(model_path=workdir, transformer_folder=workdir, prompts=["a", "b"],
                 encode=lambda p: {}, decode=lambda z: z, num_train_timesteps=int(config.ntt))
"""


def _config(world: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"world": world, "ntt": 500})


def test_a_module_path_plugs_in_a_world(tmp_path, monkeypatch):
    (tmp_path / "my_world.py").write_text(MY_WORLD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="neither one of"):  # only dotted names are taken as module paths
        worlds.make_world(_config("my_world"), str(tmp_path))
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_world.py").write_text(MY_WORLD)
    world = worlds.make_world(_config("mypkg.my_world"), str(tmp_path))
    assert list(world.prompts) == ["a", "b"] and world.num_train_timesteps == 500


def test_bad_worlds_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cannot import 'nowhere.world'"):
        worlds.make_world(_config("nowhere.world"), str(tmp_path))
    (tmp_path / "empty_pkg").mkdir()
    (tmp_path / "empty_pkg" / "__init__.py").write_text("")
    (tmp_path / "empty_pkg" / "w.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="has no make_world"):
        worlds.make_world(_config("empty_pkg.w"), str(tmp_path))


def test_builtin_worlds_import_without_the_trainer():
    """The digits and SD3 worlds plug in without importing `flowsteer_jax.train` (no import cycle)."""
    code = (
        "import importlib, sys\n"
        "from flowsteer_jax.worlds import WORLDS\n"
        "mods = [importlib.import_module(m) for m in WORLDS.values()]\n"
        "assert all(callable(m.make_world) for m in mods)\n"
        "assert 'flowsteer_jax.train' not in sys.modules, 'a world imported the trainer'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
