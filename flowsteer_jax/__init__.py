"""flowsteer-jax: FlowSteer few-step distillation of SD3-family flow models in JAX/Flax NNX."""

__version__ = "0.1.0"
