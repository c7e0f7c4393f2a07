"""Command-line helpers (not needed to train or sample)."""
