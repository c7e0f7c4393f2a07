"""The SD3 world (`config.world = "sd3"`): a diffusers SD3 folder (`model.path`) and prompts (`data.prompts`,
streamed: `flowsteer_jax.data.open_prompts`)."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from conversion.errors import InputError
from conversion.safetensors_io import read_json
from flowsteer_jax.data import DataError, open_prompts
from flowsteer_jax.distill.config import config_latent_shape, validate_model
from flowsteer_jax.flow.schedules import scheduler_settings
from flowsteer_jax.worlds import Embeds, World, fingerprint

log = logging.getLogger("flowsteer_jax.worlds.sd3")


def make_world(config: ml_collections.ConfigDict, workdir: str) -> World:
    from flowsteer_jax.models.loading import SD3_COMPONENTS, check_pipeline, load_vae, pipeline_fingerprints
    from flowsteer_jax.text import SD3PromptEncoder

    path = config.model.path
    if not path:
        raise InputError(
            "model.path is empty: set --config.model.path to a diffusers SD3 folder (or make a tiny one: "
            "python -m flowsteer_jax.tools.tiny_model --out=DIR)"
        )
    # Every component the run loads (the VAE only for the sample grids, after training), before loading any.
    check_pipeline(path, what="model.path")
    # And what the transformer's config.json decides (LoRA targets, D depth, latent shape), before the encoders load.
    config_path = os.path.join(path, "transformer", "config.json")
    transformer_config = read_json(config_path, "transformer config")
    latent_shape = config_latent_shape(config, transformer_config, config_path)
    validate_model(config, transformer_config, latent_shape, config_path)
    if not config.data.prompts:
        raise InputError(
            "data.prompts is empty: set --config.data.prompts to a .txt, .jsonl or .parquet prompt file (or a glob or "
            "folder of them, or a datasets save_to_disk folder)"
        )
    try:
        prompts = open_prompts(config.data.prompts, config.data.text_column)
    except DataError as e:
        raise DataError(f"data.prompts: {e}") from e
    dtype = jnp.dtype(config.model.dtype)
    encoder = SD3PromptEncoder.from_pretrained(path, dtype)
    max_len = int(config.data.max_sequence_length)
    settings = {}
    if os.path.isdir(os.path.join(path, "scheduler")):
        settings = scheduler_settings(path)
        if settings["shift"] != float(config.distill.shift):
            log.warning(
                "%s/scheduler has shift %g; the student is distilled for distill.shift=%g (its sampler must use it)",
                path,
                settings["shift"],
                float(config.distill.shift),
            )

    def encode(batch: list[str]) -> Embeds:
        out = encoder.encode_prompt(batch, do_classifier_free_guidance=False, max_sequence_length=max_len)
        return {"prompt_embeds": np.asarray(out.prompt_embeds), "pooled": np.asarray(out.pooled_prompt_embeds)}

    decoder: list = []  # built on first use (only process 0 draws sample grids), then compiled once

    def decode(latents: np.ndarray) -> np.ndarray:
        if not decoder:
            graphdef, state = nnx.split(load_vae(os.path.join(path, "vae"), dtype))
            fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_latents(z))
            decoder.append(lambda z: fn(state, z))
        images = decoder[0](jnp.asarray(latents, dtype))
        return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)

    digest = prompts.fingerprint()
    return World(
        model_path=os.path.abspath(path),
        transformer_folder=os.path.join(path, "transformer"),
        prompts=prompts,
        encode=encode,
        decode=decode,
        fingerprint=fingerprint(os.path.abspath(path), digest, str(max_len), config.model.dtype),
        components=pipeline_fingerprints(path, [n for n in SD3_COMPONENTS if n != "transformer"]),
        **({"num_train_timesteps": settings["num_train_timesteps"]} if settings else {}),
    )
