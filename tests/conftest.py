"""Test setup: JAX on CPU (GPU/TPU compile-only), full-precision matmuls, and jax imported before torch."""

import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from flowsteer_jax import chips  # noqa: E402

chips.enable()  # the compile-only tests' GPU/TPU plugins, when installed, start without a chip

import jax  # noqa: E402  (must come before torch: both bundle their own runtimes)

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402, F401

# PyPI's torchvision (needed by open_clip, pytorch-fid, torchmetrics, torch-fidelity, our references) is a CUDA build:
# its C ops (nms, roi_align, ...) cannot load beside the CPU torch wheel, and registering their fake kernels is what
# fails at import. The references use only torchvision's pure-Python models and transforms, so skip that one module.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import torchvision  # noqa: E402, F401


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
