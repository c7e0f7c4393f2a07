"""The compositional world's VAE: a tiny SD3-architecture `AutoencoderKL` trained on the world's training scenes.

Same modules as SD3's VAE (`models.vae`: diffusers' Encoder/Decoder with the mid-block attention, no quant
convs), two blocks of widths (8, 16), so one downsampling: (24, 24, 3) scenes -> (12, 12, 4) latents. Trained
as a KL autoencoder (posterior sample, MSE reconstruction + a small KL weight so the latents stay smooth, no GAN
or LPIPS at this size), AdamW with warmup + cosine, in one jitted step. Then, as SD3's factors were chosen, the
posterior means of training scenes give `shift_factor` = their mean and `scaling_factor` = 1 / their std, so the
diffusion model sees latents of mean 0 and std 1. Saved as a diffusers `vae/` folder (`save_vae`; diffusers'
`AutoencoderKL.from_pretrained` loads it) with `META_FILE` written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from flowsteer_jax.compose import data
from flowsteer_jax.digits.teacher import write_atomically
from flowsteer_jax.models.loading import load_vae, save_vae
from flowsteer_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

META_FILE = "compose_vae.json"
LATENT_CHANNELS = 4
DOWNSAMPLE = 2  # one Downsample2D per block after the first
LATENT_SHAPE = (data.CANVAS // DOWNSAMPLE, data.CANVAS // DOWNSAMPLE, LATENT_CHANNELS)

# Sizes: what trains in well under a minute on 2 CPU cores (XLA:CPU convolutions are slow; widths (16, 32) took
# 0.3 s a step at batch 64) and still reconstructs the digits and colours the classifiers read.
DEFAULTS = dict(steps=500, batch_size=32, seed=0, learning_rate=2e-3, kl_weight=1e-5, train_scenes=8192)


def vae_config() -> AutoencoderKLConfig:
    return AutoencoderKLConfig(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=data.CANVAS,
        scaling_factor=1.0,  # set from the data after training
        shift_factor=0.0,
        use_quant_conv=False,  # as SD3's
        use_post_quant_conv=False,
    )


def _loss(model: AutoencoderKL, images: jax.Array, key: jax.Array, kl_weight: float) -> tuple[jax.Array, jax.Array]:
    posterior = model.encode(images)
    recon = model.decode(posterior.sample(key))
    mse = jnp.mean(jnp.square(recon - images))
    kl = 0.5 * jnp.mean(jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)
    return mse + kl_weight * kl, mse


def _train_step(graphdef, tx, batch_size, kl_weight, params, rest, opt_state, step, key, images):
    k_idx, k_z = jax.random.split(jax.random.fold_in(key, step))
    batch = images[jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])]

    def loss_fn(p):
        return _loss(nnx.merge(graphdef, p, rest), batch, k_z, kl_weight)

    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse


@partial(jax.jit, static_argnames="graphdef")
def _encode_mean(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images).mean


def raw_latents(model: AutoencoderKL, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Posterior means (unscaled) of (N, CANVAS, CANVAS, 3) images in [-1, 1], batched."""
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk) if len(images) > batch_size else 0
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        out.append(np.asarray(_encode_mean(graphdef, state, jnp.asarray(chunk)))[: len(chunk) - pad])
    return np.concatenate(out)


def encode_latents(model: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """What the diffusion model sees: `(mean - shift_factor) * scaling_factor` (`AutoencoderKL.encode_latents`)."""
    return ((raw_latents(model, images) - model.shift_factor) * model.config.scaling_factor).astype(np.float32)


@partial(jax.jit, static_argnames="graphdef")
def _decode(graphdef, state, latents):
    return data.digits_data.to_unit(nnx.merge(graphdef, state).decode_latents(latents).astype(jnp.float32))


def decode(model: AutoencoderKL, latents: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Diffusion-model latents (N, 12, 12, 4) -> images (N, CANVAS, CANVAS, 3) in [0, 1], as SD3's pipeline
    decodes (`vae.decode(z / scaling_factor + shift_factor)`), batched (the last batch padded: one compile)."""
    graphdef, state = nnx.split(model)
    latents = np.asarray(latents, np.float32)
    out = []
    size = min(batch_size, len(latents))
    for start in range(0, len(latents), size):
        chunk = latents[start : start + size]
        pad = size - len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        out.append(np.asarray(_decode(graphdef, state, jnp.asarray(chunk)))[: size - pad])
    return np.concatenate(out)


def train_vae(
    folder: str,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    learning_rate: float = DEFAULTS["learning_rate"],
    kl_weight: float = DEFAULTS["kl_weight"],
    train_scenes: int = DEFAULTS["train_scenes"],
    progress: bool = True,
) -> AutoencoderKL:
    """Train the VAE on `train_scenes` random training-split scenes, set its latent factors from them, save it to
    `folder` (a diffusers `vae/` folder) and return it."""
    settings = dict(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        kl_weight=kl_weight,
        train_scenes=train_scenes,
    )
    start = time.time()
    images = data.sample_scenes(np.random.default_rng(seed), train_scenes, "train").images
    model = AutoencoderKL(vae_config(), rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    warmup = min(100, max(steps - 1, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=0.1 * learning_rate
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)
    step_fn = jax.jit(partial(_train_step, graphdef, tx, batch_size, kl_weight), donate_argnums=(0, 2))
    key, device_images = jax.random.key(seed), jnp.asarray(images)
    losses = []
    bar = tqdm(range(steps), desc="compose VAE", disable=not progress, mininterval=1.0)
    for step in bar:
        params, opt_state, mse = step_fn(params, rest, opt_state, jnp.int32(step), key, device_images)
        losses.append(mse)
        if (step + 1) % 100 == 0:
            bar.set_postfix(mse=f"{float(jnp.mean(jnp.stack(losses[-100:]))):.4f}")
    model = nnx.merge(graphdef, params, rest)
    z = raw_latents(model, images)
    # SD3's convention: one scalar shift and scale for all channels.
    model.config = dataclasses.replace(model.config, shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    losses = np.asarray(jax.device_get(jnp.stack(losses))) if losses else np.zeros(0)
    meta = dict(
        settings,
        train_seconds=round(time.time() - start, 1),
        final_mse=float(losses[-100:].mean()) if losses.size else None,
        shift_factor=model.config.shift_factor,
        scaling_factor=model.config.scaling_factor,
    )
    write_atomically(model, folder, meta, save_vae, META_FILE)
    return model


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, META_FILE)) and os.path.isfile(os.path.join(folder, "config.json"))


def vae_meta(folder: str) -> dict:
    with open(os.path.join(folder, META_FILE)) as f:
        return json.load(f)


def ensure_vae(folder: str, **kwargs) -> AutoencoderKL:
    """The VAE at `folder` if complete, else `train_vae(folder, **kwargs)` (a complete folder is reused as is)."""
    if is_complete(folder):
        return load_vae(folder)
    return train_vae(folder, **kwargs)
