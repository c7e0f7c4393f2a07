"""Benchmarks and device checks: `python benchmarks/<name>.py` or `python -m benchmarks.<name>` (see README)."""
