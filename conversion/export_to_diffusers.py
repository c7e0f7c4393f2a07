"""The old path of `python -m flowsteer_jax.export` (see there): `python conversion/export_to_diffusers.py ...`."""

import sys

from flowsteer_jax.export import export, main, rectified_sigmas  # noqa: F401  (the old import path too)

if __name__ == "__main__":
    sys.exit(main())
