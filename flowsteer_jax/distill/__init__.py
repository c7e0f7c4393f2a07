"""FlowSteer distillation: OTA trajectories, losses, the train state and the one jitted train step."""

from flowsteer_jax.distill.config import default_config, uses_discriminator
from flowsteer_jax.distill.state import (
    Graphs,
    abstract_train_state,
    make_optimizer,
    make_train_state,
    model_options,
    place_batch,
)
from flowsteer_jax.distill.step import build_train_step, make_step

__all__ = [
    "Graphs",
    "abstract_train_state",
    "build_train_step",
    "default_config",
    "make_optimizer",
    "make_step",
    "make_train_state",
    "model_options",
    "place_batch",
    "uses_discriminator",
]
