"""The test suite (a regular package: `.refs/` holds a `tests` package of its own, from torch-fidelity)."""
