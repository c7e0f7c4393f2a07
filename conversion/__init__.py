"""Pure-numpy weight conversion between diffusers/transformers safetensors and flat Flax paths.

Never imports flowsteer_jax and never needs torch: it can run anywhere numpy runs.
"""
