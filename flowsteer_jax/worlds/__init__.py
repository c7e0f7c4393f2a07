"""Worlds: what a training run distills on, plugged in by name (`config.world`).

A world supplies what differs between the real SD3 setting and the embedded digits default: the base
transformer folder, the prompts, their encoder, the decoder for sample grids and (for PeRFlow's interpolated
start points) data latents. `make_world(config, workdir)` imports the world's module by name and calls its
`make_world(config, workdir) -> World`: the built-in names are in `WORLDS`; any other `config.world` is taken as
a module path (`--config.world=mypackage.my_world`), so a new world needs no change here or in the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from conversion.errors import InputError
from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS

Embeds = dict[str, np.ndarray]  # {"prompt_embeds": (B, S, J), "pooled": (B, P)}

WORLDS = {
    "sd3": "flowsteer_jax.worlds.sd3",
    "digits": "flowsteer_jax.digits.world",
    "digits_compose": "flowsteer_jax.compose.world",
}


@dataclasses.dataclass
class World:
    """What the run trains on. `encode` and `decode` run on the calling process's own devices."""

    model_path: str  # what the checkpoint records as the base
    transformer_folder: str  # diffusers `transformer/` folder of the base (teacher) weights
    prompts: Sequence[str]  # the training items
    encode: Callable[[list[str]], Embeds]
    decode: Callable[[np.ndarray], np.ndarray]  # NHWC latents -> NHWC images in [0, 1]
    latent_shape: tuple[int, int, int] | None = None  # None: from the config / the transformer
    x0: Callable[[np.ndarray], np.ndarray] | None = None  # item indices -> data latents (PeRFlow start points)
    eval_prompts: Sequence[str] | None = None  # None: config.eval.prompts
    finish: Callable[..., Any] | None = None  # after training, every process: (config, workdir, student, stats)
    fingerprint: str = ""  # identifies prompts + encoder for the embedding cache
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS  # the base's scheduler's (sigma -> model timestep)
    # The world's own scores of the eval samples (NHWC images in [0, 1], in eval-prompt order), logged beside
    # `eval.metrics`; None: none.
    score: Callable[[np.ndarray], dict[str, float]] | None = None
    # The world's own config section (e.g. "digits"): each of its keys defines the run, so a resume refuses a
    # change (`checkpoint.run_settings`), but for `config_folders`, its keys naming folders whose content
    # `components` (or the transformer's `base_fingerprint`) records: moving such a folder is no change.
    config_section: str = ""
    config_folders: tuple[str, ...] = ()
    # {name: fingerprint} of every model the run uses besides the base transformer (text encoders, tokenizers,
    # VAE; None: the pipeline has none): a resume refuses other content, wherever it lies.
    components: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Lab:
    """A toy world's teacher and one seed's fixed evaluation set: what the ablation's teacher-only tables (the
    paper's Tables 1 and 2) sample and score, the same way for every toy world."""

    model: Any  # the teacher (an MMDiT-like NNX module)
    cond: tuple[np.ndarray, ...]  # (embeds, pooled, uncond_embeds, uncond_pooled) of the evaluation prompts
    noise: np.ndarray  # (N, *latent_shape) the evaluation noise
    x0: np.ndarray  # (N, *latent_shape) data latents of real images for the evaluation prompts (training split)
    decode: Callable[[np.ndarray], np.ndarray]  # latents -> images in [0, 1]
    score: Callable[[np.ndarray, np.ndarray | None], dict[str, float]]  # (images, reference images) -> metrics
    save: Callable[[str, np.ndarray], None]  # (path.npz, images): the samples with their prompts' labels
    guidance: float  # the teacher's CFG scale for its reference samples
    # (images) -> (N,) bool: each image right for its prompt (paired tests of Table 1 and the gate); None: none
    correct: Callable[[np.ndarray], np.ndarray] | None = None


def make_world(config: ml_collections.ConfigDict, workdir: str) -> World:
    """The world `config.world` names (a key of `WORLDS`, or a module path), built for this run."""
    name = str(config.world)
    module_name = WORLDS.get(name, name if "." in name else None)
    if module_name is None:
        raise InputError(f"world={name!r} is neither one of {sorted(WORLDS)} nor a module path (a.b.c)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise InputError(f"world={name!r}: cannot import {module_name!r} ({e})") from e
    if not callable(getattr(module, "make_world", None)):
        raise InputError(f"world={name!r}: module {module_name!r} has no make_world(config, workdir)")
    return module.make_world(config, workdir)


def fingerprint(*parts: str) -> str:
    """A short stable hash of `parts` (what a world's embedding cache is valid for)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
