"""Sigma schedules for SD3-style rectified-flow sampling.

Two kinds, shared by teacher and student (docs/design.md, "Schedules"):

- ``"diffusers"``: bit-identical to ``FlowMatchEulerDiscreteScheduler.set_timesteps(n).sigmas`` with the
  default config. It spaces n points between the scheduler's *already shifted* ``sigma_max``/``sigma_min``
  and shifts them again, so the last model call lands near 0.009 instead of spanning a real step.
- ``"rectified"``: ``shift(linspace(1, 0, n + 1))``; the endpoint 0 is in the grid before shifting.

Pure numpy: this module must not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("rectified", "diffusers")

# Scheduler config keys that change the sigmas in ways we do not reproduce. diffusers applies each one only
# when it is truthy, so a falsy value (False, None, 0) is the default behaviour.
_UNSUPPORTED_KEYS = (
    "use_dynamic_shifting",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "shift_terminal",
    "stochastic_sampling",
)
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def shift_sigmas(s: Any, shift: float) -> Any:
    """SD3 time shift ``k * s / (1 + (k - 1) * s)``; maps 0 -> 0 and 1 -> 1, pushes the middle toward 1."""
    return shift * s / (1 + (shift - 1) * s)


def _check(n: int, kind: str, shift: float, num_train_timesteps: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1, got {n!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(shift, bool) or not isinstance(shift, int | float | np.integer | np.floating):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int | np.integer):
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")


def _diffusers_sigmas(n: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    # Mirrors diffusers 0.42.1 step by step. __init__ works in float32 (torch, with the python scalars
    # rounded to float32 first); set_timesteps works in float64 numpy and rounds to float32 at the end.
    f32 = np.float32
    train_t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    train_sigmas = train_t / f32(num_train_timesteps)
    train_sigmas = f32(shift) * train_sigmas / (f32(1) + f32(shift - 1) * train_sigmas)
    # The stored bounds are already shifted; set_timesteps shifts them again (the flaw, diffusers #13243).
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])

    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, n)
    s = t / num_train_timesteps
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def sigmas(n: int, kind: str = "rectified", shift: float = 3.0, *, num_train_timesteps: int = 1000) -> np.ndarray:
    """The ``n + 1`` sigmas of an ``n``-step schedule, float32, from (about) 1 down to exactly 0."""
    _check(n, kind, shift, num_train_timesteps)
    shift = float(shift)  # a numpy float64 would otherwise change the float32 promotion in the diffusers path
    if kind == "diffusers":
        return _diffusers_sigmas(int(n), shift, int(num_train_timesteps))
    # float64 then one rounding: each value is the float32 nearest the exact shifted grid point.
    return shift_sigmas(np.linspace(1.0, 0.0, n + 1), shift).astype(np.float32)


def timesteps(sigmas: Any, num_train_timesteps: int = 1000) -> Any:
    """The model's timestep input for each step (the final sigma 0 is never fed to the model)."""
    return sigmas[:-1] * num_train_timesteps


def scheduler_settings(folder: str | Path) -> dict[str, Any]:
    """Read ``shift`` and ``num_train_timesteps`` from a diffusers scheduler config.

    ``folder`` is a diffusers pipeline root (containing ``scheduler/``) or the scheduler folder itself.
    Configs that would make diffusers produce sigmas we do not reproduce are refused, naming the key.
    """
    folder = Path(folder)
    candidates = [folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no scheduler config: neither {candidates[0]} nor {candidates[1]} exists")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e

    cls = config.get("_class_name", _SCHEDULER_CLASS)
    if cls != _SCHEDULER_CLASS:
        raise ValueError(f"{path}: _class_name={cls!r} is not supported, only {_SCHEDULER_CLASS}")
    for key in _UNSUPPORTED_KEYS:
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (only the default is)")

    # diffusers' own defaults when the keys are absent.
    shift = float(config.get("shift", 1.0))
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{path}: shift must be a finite number > 0, got {shift!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"{path}: num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    return {"shift": shift, "num_train_timesteps": num_train_timesteps}
