"""Re-randomise every tensor of a torch model: parity tests and benchmarks need weights with nothing left at init.

Needs torch at call time only (imported inside): `import flowsteer_jax` stays torch-free.
"""

from __future__ import annotations

import numpy as np


def randomize_(module, seed: int = 0):
    """Overwrite every parameter and floating buffer of a torch `module` with random values; returns it.

    Zero-initialised paths (adaLN-Zero gates, proj_out) and all-ones norms would let a wrong mapping pass, so
    nothing keeps its init. Matrices get N(0, 1/fan_in) so activations stay O(1) through the depth; vectors
    (biases, norm scales) get 1 + N(0, 0.2) for norm scales and N(0, 0.2) otherwise; the sincos position table
    0.5 N(0, 1).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("pos_embed.pos_embed"):
                r = 0.5 * r  # the sincos table it replaces is O(1) per entry
            elif t.ndim >= 2:
                r = r / np.sqrt(np.prod(t.shape[1:]))
            elif "norm" in name:
                r = 1 + 0.2 * r
            else:
                r = 0.2 * r
            t.copy_(r.to(t.dtype))
    return module
