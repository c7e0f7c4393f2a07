"""Helpers for parity tests: tiny diffusers/transformers models with every tensor re-randomised."""

from __future__ import annotations

import numpy as np
import torch

from flowsteer_jax.tools.randomize import randomize_  # noqa: F401  (the tests' import path)


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
