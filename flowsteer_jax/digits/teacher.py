"""Pretrain the digits world's teacher: a tiny MMDiT trained with rectified-flow matching, saved for diffusers.

Training follows the conventions (docs/design.md, "Conventions"): `x_t = (1 - t) x0 + t eps`, target
`v = eps - x0`, model timestep `flow.sampling.timestep(t)` (`t * 1000`), `t ~ sigmoid(N(0, 1))` (SD3's
logit-normal, mean 0, std 1), 10% of prompts replaced by the empty prompt so CFG works. Data: random pairs of
training-split digits (`data`), prompts in random phrasings, embedded once through the digits world's SD3
conditioning path (`text.prompt_table`). One jitted step (`nnx.split` once, pure `jax.jit`, `nnx.merge`
inside), AdamW with warmup + cosine decay, gradient clipping, an EMA of the weights
(saved); deterministic for a seed.

Other toy worlds pretrain their teacher here too: `DataSource` says what a batch is (the data latents and their
prompt ids, drawn on device from the source's tables) and the latent shape; the default is the digits pairs.

Defaults (`DEFAULTS`, the keyword defaults of `pretrain_teacher`): 4 joint blocks, 2 heads x 16 (width 32),
batch 64, 2,500 steps, AdamW lr 3e-3 (100 warmup steps, cosine to 10%), no weight decay, clip 1.0, EMA 0.999.
Why these sizes, and what the teacher scores: docs/design.md ("Defaults and where they come from") and the
README's digits table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from flowsteer_jax.digits import data, text
from flowsteer_jax.flow.sampling import timestep
from flowsteer_jax.models.loading import load_transformer, save_transformer
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig

META_FILE = "digits_teacher.json"  # written last into the folder: settings, loss, time
CFG_DROPOUT = 0.1
GUIDANCE = 3.0  # recommended CFG scale for the teacher's 28-step samples (and OTA's centre)

# Keyword defaults of `pretrain_teacher` / `ensure_teacher`.
DEFAULTS = dict(
    steps=2500,
    batch_size=64,
    seed=0,
    num_layers=4,
    num_attention_heads=2,
    attention_head_dim=16,
    learning_rate=3e-3,
    warmup_steps=100,
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.999,
    text_seed=0,
)


class DataSource(NamedTuple):
    """What teacher pretraining draws its batches from.

    `sample(key_a, key_b, batch_size, tables) -> (x0 (B, *latent_shape), prompt ids (B,))` is traced into the
    jitted step; ids index `embeds`/`pooled`, whose row 0 must be the empty prompt (CFG dropout uses it).
    """

    latent_shape: tuple[int, int, int]
    tables: tuple  # arrays `sample` reads (device-resident for the whole run)
    sample: Callable[..., tuple[jax.Array, jax.Array]]
    embeds: np.ndarray  # (P, S, J) every prompt's embedding, row 0 = ""
    pooled: np.ndarray  # (P, D)
    name: str = "digits"  # recorded in the teacher's metadata


def _digit_pairs(k_idx: jax.Array, k_ph: jax.Array, batch_size: int, tables) -> tuple[jax.Array, jax.Array]:
    images, labels = tables
    idx = jax.random.randint(k_idx, (batch_size, 2), 0, images.shape[0])
    x0 = jnp.concatenate([images[idx[:, 0]], images[idx[:, 1]]], axis=-1)[..., None]
    digits = labels[idx]
    phrasing = jax.random.randint(k_ph, (batch_size,), 0, data.NUM_PHRASINGS)
    return x0, data.prompt_index(digits[:, 0], digits[:, 1], phrasing)


def digits_source(text_seed: int = 0) -> DataSource:
    """Random pairs of training-split digits in random phrasings (the digits world)."""
    images, labels = data.single_digits("train")
    embeds, pooled = text.prompt_table(text_seed)
    return DataSource(
        data.IMAGE_SHAPE, (jnp.asarray(data.scale(images)), jnp.asarray(labels)), _digit_pairs, embeds, pooled
    )


def teacher_config(
    num_layers: int = 4,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_shape: tuple[int, int, int] = data.IMAGE_SHAPE,
) -> MMDiTConfig:
    """The teacher's MMDiT: patch 2 on the latents (the (8, 16, 1) digit pair -> a 4x8 patch grid), SD3-shaped
    conditioning."""
    inner = num_attention_heads * attention_head_dim
    height, width, channels = latent_shape
    side = max(height, width)
    return MMDiTConfig(
        sample_size=side,  # base size side / 2 patches for the positional table
        patch_size=2,
        in_channels=channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text.JOINT_ATTENTION_DIM,
        caption_projection_dim=inner,
        pooled_projection_dim=text.POOLED_DIM,
        out_channels=channels,
        pos_embed_max_size=side // 2,  # covers the patch grid (centre crop)
    )


def _zero_init(model: MMDiT) -> None:
    """adaLN-Zero (DiT): zero the modulation projections and the output projection, so every block starts as
    the identity and the initial velocity is 0."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        if (".norm1" in name or "norm1_context" in name or name.startswith(("norm_out", "proj_out"))) and (
            path[-1] in ("kernel", "bias")
        ):
            var.set_value(jnp.zeros_like(var.get_value()))


def _schedule(learning_rate: float, warmup_steps: int, steps: int) -> optax.Schedule:
    warmup = min(warmup_steps, max(steps - 1, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=0.1 * learning_rate
    )


def _loss(model: MMDiT, key: jax.Array, batch_size: int, sample, tables) -> jax.Array:
    data_tables, embeds, pooled = tables
    k_a, k_b, k_drop, k_t, k_eps = jax.random.split(key, 5)
    x0, pid = sample(k_a, k_b, batch_size, data_tables)
    pid = jnp.where(jax.random.uniform(k_drop, (batch_size,)) < CFG_DROPOUT, 0, pid)  # 0: the empty prompt
    t = jax.nn.sigmoid(jax.random.normal(k_t, (batch_size,)))
    eps = jax.random.normal(k_eps, x0.shape)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    v = model(x_t, timestep(t), embeds[pid], pooled[pid])
    return jnp.mean(jnp.square(v - (eps - x0)))


def _train_step(graphdef, tx, batch_size, sample, ema_decay, params, rest, opt_state, ema, step, key, tables):
    def loss_fn(p):
        return _loss(nnx.merge(graphdef, p, rest), jax.random.fold_in(key, step), batch_size, sample, tables)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, opt_state, ema, loss


def pretrain_teacher(
    folder: str,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    num_layers: int = DEFAULTS["num_layers"],
    num_attention_heads: int = DEFAULTS["num_attention_heads"],
    attention_head_dim: int = DEFAULTS["attention_head_dim"],
    learning_rate: float = DEFAULTS["learning_rate"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    weight_decay: float = DEFAULTS["weight_decay"],
    grad_clip: float = DEFAULTS["grad_clip"],
    ema_decay: float | None = DEFAULTS["ema_decay"],
    text_seed: int = DEFAULTS["text_seed"],
    source: DataSource | None = None,
    progress: bool = True,
) -> MMDiT:
    """Train the teacher from scratch and write it to `folder` as a diffusers `transformer/` folder.

    Returns the trained MMDiT (the EMA weights when `ema_decay` is set; those are what is saved). The folder is
    written to a temporary sibling and renamed into place, so `folder` either does not exist or is complete.
    `text_seed` picks the frozen text encoders (`text.prompt_table`): the student must use the same.
    `source`: the data (default `digits_source(text_seed)`).
    """
    source = digits_source(text_seed) if source is None else source
    settings = dict(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        text_seed=text_seed,
    )
    if source.name != "digits":
        settings.update(data=source.name, latent_shape=list(source.latent_shape))
    start = time.time()
    tables = (source.tables, jnp.asarray(source.embeds), jnp.asarray(source.pooled))
    mcfg = teacher_config(num_layers, num_attention_heads, attention_head_dim, source.latent_shape)
    model = MMDiT(mcfg, rngs=nnx.Rngs(seed))
    _zero_init(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(_schedule(learning_rate, warmup_steps, steps), weight_decay=weight_decay),
    )
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    step_fn = jax.jit(
        partial(_train_step, graphdef, tx, batch_size, source.sample, 0.0 if ema_decay is None else ema_decay),
        donate_argnums=(0, 2, 3),
    )
    key = jax.random.key(seed)
    losses = []
    bar = tqdm(range(steps), desc=f"{source.name} teacher", disable=not progress, mininterval=1.0)
    for step in bar:
        params, opt_state, ema, loss = step_fn(params, rest, opt_state, ema, jnp.int32(step), key, tables)
        losses.append(loss)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            recent = float(jnp.mean(jnp.stack(losses[-100:])))
            bar.set_postfix(loss=f"{recent:.4f}")
    final = params if ema_decay is None else ema
    model = nnx.merge(graphdef, final, rest)
    losses = np.asarray(jax.device_get(jnp.stack(losses))) if losses else np.zeros(0)
    meta = dict(
        settings,
        train_seconds=round(time.time() - start, 1),
        final_loss=float(losses[-100:].mean()) if losses.size else None,
    )
    write_atomically(model, folder, meta)
    return model


def write_atomically(
    model: nnx.Module, folder: str, meta: dict, save: Callable = save_transformer, meta_file: str = META_FILE
) -> None:
    """`save(model, folder)` plus `meta` as `meta_file` (written last), through a temporary sibling renamed into
    place: `folder` either does not exist or is complete."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save(model, tmp)
    with open(os.path.join(tmp, meta_file), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def is_complete(folder: str) -> bool:
    """Whether `folder` holds a finished teacher (its metadata file is written last, then the folder renamed)."""
    return os.path.isfile(os.path.join(folder, META_FILE)) and os.path.isfile(os.path.join(folder, "config.json"))


def teacher_meta(folder: str) -> dict:
    with open(os.path.join(folder, META_FILE)) as f:
        return json.load(f)


def ensure_teacher(folder: str, **kwargs) -> MMDiT:
    """The teacher at `folder` if it is complete (loaded with `load_transformer`), else `pretrain_teacher(folder,
    **kwargs)`. A complete folder is reused as it is, whatever `kwargs` say (delete it to retrain)."""
    if is_complete(folder):
        return load_transformer(folder)
    return pretrain_teacher(folder, **kwargs)
