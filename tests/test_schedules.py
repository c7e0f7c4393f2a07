"""Sigma schedules: bit-exact against diffusers' FlowMatchEulerDiscreteScheduler, plus the rectified fix."""

import json

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from flowsteer_jax.flow import schedules

STEPS = [*range(1, 51), 100, 1000]
SHIFTS = [1.0, 3.0, 6.0, 0.5, 0.3, 1.7, 7.3, 12.75738566]


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_train_timesteps", [1000, 999])
def test_diffusers_kind_is_bit_exact(shift, num_train_timesteps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=num_train_timesteps)
    for n in STEPS:
        scheduler.set_timesteps(n)
        ref = scheduler.sigmas.numpy()
        ours = schedules.sigmas(n, "diffusers", shift, num_train_timesteps=num_train_timesteps)
        assert ours.dtype == np.float32 and ours.shape == (n + 1,)
        assert np.array_equal(ours, ref), (n, shift, ours, ref)
        t = schedules.timesteps(ours, num_train_timesteps)
        assert t.dtype == np.float32
        assert np.array_equal(t, scheduler.timesteps.numpy()), (n, shift)


def test_diffusers_flaw_values():
    # docs/design.md, "Schedules": the doubly shifted sigma_min makes the last step a wasted 0.0089 one.
    s = schedules.sigmas(4, "diffusers", 3.0)
    np.testing.assert_allclose(s, [1.0, 0.8577, 0.6022, 0.0089, 0.0], atol=5e-5)


def test_rectified_values():
    s = schedules.sigmas(4, "rectified", 3.0)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, np.array([1.0, 0.9, 0.75, 0.5, 0.0], np.float32))
    assert np.array_equal(schedules.sigmas(4), s)  # rectified, shift 3 is the default


@pytest.mark.parametrize("shift", SHIFTS)
def test_rectified_endpoints_and_monotone(shift):
    for n in STEPS:
        s = schedules.sigmas(n, "rectified", shift)
        assert s.shape == (n + 1,) and s[0] == 1.0 and s[-1] == 0.0
        assert np.all(np.diff(s) < 0)
        expected = schedules.shift_sigmas(np.linspace(1.0, 0.0, n + 1), shift).astype(np.float32)
        np.testing.assert_array_equal(s, expected)


def test_shift_sigmas():
    s = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(schedules.shift_sigmas(s, 3.0), [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(schedules.shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": -3}, "n"),
        ({"n": 2.0}, "n"),
        ({"n": 4, "kind": "karras"}, "kind"),
        ({"n": 4, "shift": 0.0}, "shift"),
        ({"n": 4, "shift": -1.0}, "shift"),
        ({"n": 4, "shift": float("nan")}, "shift"),
        ({"n": 4, "num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        schedules.sigmas(**kwargs)


def test_bad_kind_lists_allowed():
    with pytest.raises(ValueError, match="rectified.*diffusers"):
        schedules.sigmas(4, "linear")


def test_scheduler_settings_roundtrip(tmp_path):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "scheduler")
    expected = {"shift": 3.0, "num_train_timesteps": 1000}
    assert schedules.scheduler_settings(tmp_path) == expected
    assert schedules.scheduler_settings(tmp_path / "scheduler") == expected


def test_scheduler_settings_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        schedules.scheduler_settings(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dynamic_shifting", True),
        ("use_karras_sigmas", True),
        ("use_exponential_sigmas", True),
        ("use_beta_sigmas", True),
        ("invert_sigmas", True),
        ("shift_terminal", 0.1),
        ("stochastic_sampling", True),
        ("_class_name", "EulerDiscreteScheduler"),
    ],
)
def test_scheduler_settings_refuses_unsupported(tmp_path, key, value):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "scheduler")
    path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key) as err:
        schedules.scheduler_settings(tmp_path)
    assert "scheduler_config.json" in str(err.value)


def test_module_does_not_import_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(schedules))
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for a in node.names]
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any("torch" in (m or "") for m in names + modules)
