"""Evaluation in the digits world: a digit classifier, prompt accuracy, Fréchet distance, fidelity; sampling.

- The classifier is scikit-learn's `MLPClassifier` (one hidden layer of `HIDDEN` ReLU units, fixed
  `random_state`) trained on the TRAINING split's single digits (pixels / 16 in [0, 1]), stored as weights
  (`classifier.npz`, `digits.mlp`: scores do not depend on the machine). A pair image is scored
  by classifying its left and right 8x8 halves; prompt accuracy counts pairs with both digits right (a toy
  GenEval).
- Fréchet distance between Gaussians fitted to classifier hidden features (left half's ++ right half's,
  2 * HIDDEN dims) of the images and of `reference_pairs()`: real pairs from the HELD-OUT split.
- Mean squared distance to a reference set (e.g. the teacher's 28-step output from the same noise and prompt).

`eval_set` fixes prompts, digits and noise; `sample` integrates any MMDiT-like NNX module (the teacher, or the
student = the same MMDiT with LoRA applied) with the project's one sampler (`flow.sampling`), jitted and batched.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from flowsteer_jax.digits import data, mlp
from flowsteer_jax.flow.sampling import model_velocity
from flowsteer_jax.flow.sampling import sample as flow_sample
from flowsteer_jax.flow.schedules import sigmas as make_sigmas

HIDDEN = 64
CLASSIFIER_SEED = 0
EVAL_SEED = 1234
REFERENCE_SEED = 4321


class EvalSet(NamedTuple):
    prompts: list[str]  # N
    digits: np.ndarray  # (N, 2) int64: (left, right)
    noise: np.ndarray  # (N, 8, 16, 1) float32, N(0, 1): the starting latents


def eval_set(n: int = 1000, seed: int = EVAL_SEED) -> EvalSet:
    """A fixed evaluation set: the 100 (left, right) pairs equally often (as far as `n` allows), random
    phrasings, and fixed Gaussian noise; the same for the same `(n, seed)`."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10), indexing="ij"), -1).reshape(100, 2)
    digits = np.concatenate([np.tile(grid, (n // 100, 1)), grid[rng.permutation(100)[: n % 100]]])
    digits = digits[rng.permutation(n)].astype(np.int64)
    phrasing = rng.integers(0, data.NUM_PHRASINGS, size=n)
    prompts = [data.prompt_for(int(a), int(b), int(p)) for (a, b), p in zip(digits, phrasing, strict=True)]
    noise = rng.standard_normal((n, *data.IMAGE_SHAPE)).astype(np.float32)
    return EvalSet(prompts, digits, noise)


# --- classifier ---


CLASSIFIER_FILE = os.path.join(os.path.dirname(__file__), "classifier.npz")  # `mlp.main` writes it


def fit_classifier() -> mlp.MLP:
    """The digit classifier as it was made: scikit-learn's MLPClassifier on the training split's digits."""
    images, labels = data.single_digits("train")
    return mlp.fit(images.reshape(len(images), -1) / 16.0, labels, HIDDEN, CLASSIFIER_SEED, max_iter=1000)


@functools.cache
def classifier() -> mlp.MLP:
    """The fixed digit classifier: the stored weights (`CLASSIFIER_FILE`), so scores do not depend on the
    machine or the scikit-learn version."""
    return mlp.load(CLASSIFIER_FILE, fit_classifier)


def _halves(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 16[, 1]) pair images in [0, 1] -> left and right halves flattened, (N, 64) each."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"expected one channel, got shape {images.shape}")
        images = images[..., 0]
    if images.shape[1:] != data.IMAGE_SHAPE[:2]:
        raise ValueError(f"expected pair images of shape (N, 8, 16[, 1]), got {images.shape}")
    n = len(images)
    return images[:, :, :8].reshape(n, 64), images[:, :, 8:].reshape(n, 64)


def classify(images: np.ndarray) -> np.ndarray:
    """(N, 2) predicted (left, right) digits of pair images in [0, 1]."""
    left, right = _halves(images)
    clf = classifier()
    return np.stack([clf.predict(left), clf.predict(right)], axis=1).astype(np.int64)


def features(images: np.ndarray) -> np.ndarray:
    """(N, 2 * HIDDEN) classifier hidden features (ReLU layer) of both halves, concatenated."""
    clf = classifier()
    return np.concatenate([clf.hidden(h) for h in _halves(images)], axis=1)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    cov_a, cov_b = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    # tr sqrt(A B) = sum sqrt(eig(sqrt(A) B sqrt(A))): symmetric PSD throughout, so dead (constant) features and
    # singular covariances need no special case.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def reference_pairs(n: int = 1000, seed: int = REFERENCE_SEED) -> data.Pairs:
    """Real pairs from the HELD-OUT split (images in [-1, 1]): the FD reference."""
    return data.sample_pairs(np.random.default_rng(seed), n, "test")


@functools.cache
def _reference_features(n: int, seed: int) -> np.ndarray:
    return features(data.to_unit(reference_pairs(n, seed).images))


def evaluate(
    images: np.ndarray,
    digits: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    fd_reference: tuple[int, int] = (1000, REFERENCE_SEED),
) -> dict[str, float]:
    """Metrics of (N, 8, 16[, 1]) pair images in [0, 1] generated for the (N, 2) `digits`.

    Returns `accuracy` (both digits right), `left_accuracy`, `right_accuracy`, `fd` (vs `reference_pairs(
    *fd_reference)`), and with `reference` (same shape, [0, 1]) `mse_to_reference`: the mean over images of the
    mean squared pixel difference.
    """
    digits = np.asarray(digits)
    pred = classify(images)
    if pred.shape != digits.shape:
        raise ValueError(f"digits must have shape {pred.shape}, got {digits.shape}")
    correct = pred == digits
    out = dict(
        accuracy=float(correct.all(1).mean()),
        left_accuracy=float(correct[:, 0].mean()),
        right_accuracy=float(correct[:, 1].mean()),
        fd=frechet_distance(features(images), _reference_features(*fd_reference)),
    )
    if reference is not None:
        a, b = np.asarray(images, np.float32), np.asarray(reference, np.float32)
        if a.size != b.size:
            raise ValueError(f"reference has shape {b.shape}, images {a.shape}")
        out["mse_to_reference"] = float(np.mean(np.square(a.reshape(b.shape) - b)))
    return out


# --- sampling ---


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "raw"))
def _sample_batch(
    graphdef, state, noise, embeds, pooled, uncond_embeds, uncond_pooled, sigmas, guidance, *, cfg, raw=False
):
    model_fn = model_velocity(nnx.merge(graphdef, state))
    cond = {"prompt_embeds": embeds, "pooled": pooled}
    uncond = None
    if cfg:
        uncond = {"prompt_embeds": uncond_embeds, "pooled": uncond_pooled}
        uncond = {k: jnp.broadcast_to(u, cond[k].shape) for k, u in uncond.items()}
    x = flow_sample(model_fn, noise, sigmas, cond, uncond, guidance if cfg else 0.0).astype(jnp.float32)
    return x if raw else data.to_unit(x)


def sample(
    model: nnx.Module,
    encoder_outputs: tuple[np.ndarray, ...],
    noise: np.ndarray,
    *,
    steps: int | None = None,
    schedule: str = "rectified",
    shift: float = 3.0,
    guidance: float = 1.0,
    sigmas: np.ndarray | None = None,
    batch_size: int = 250,
    progress: bool = True,
    raw: bool = False,
) -> np.ndarray:
    """Generate (N, 8, 16, 1) float32 images in [0, 1] from (N, 8, 16, 1) `noise` (`raw`: the final latents
    as they are, any latent shape, for worlds with a VAE).

    `encoder_outputs`: `(prompt_embeds, pooled)` for the N prompts, or `(prompt_embeds, pooled, uncond_embeds,
    uncond_pooled)` (the unconditional pair with batch 1 or N; `text.encode_with_uncond` returns this), needed
    when `guidance > 1`. `guidance <= 1`: one forward per step, no CFG. `sigmas(steps, schedule, shift)` from
    `flow.schedules`, or the given `sigmas` (decreasing, from the noise level of `noise` to 0; e.g. the tail of a
    grid, to resume a solve); `model(x_nhwc, timestep, prompt_embeds, pooled) -> v`, any MMDiT-like NNX module.
    Batches of `batch_size` (the last one padded, so one compilation).
    """
    embeds, pooled = (np.asarray(a, np.float32) for a in encoder_outputs[:2])
    cfg = guidance > 1
    if cfg:
        if len(encoder_outputs) != 4:
            raise ValueError("guidance > 1 needs encoder_outputs = (embeds, pooled, uncond_embeds, uncond_pooled)")
        u_embeds, u_pooled = (np.asarray(a, np.float32) for a in encoder_outputs[2:])
    else:
        u_embeds, u_pooled = embeds[:1], pooled[:1]  # unused
    noise = np.asarray(noise, np.float32)
    n = len(noise)
    if len(embeds) != n or len(pooled) != n:
        raise ValueError(f"{n} noise samples but {len(embeds)} prompt embeddings / {len(pooled)} pooled")
    if (steps is None) == (sigmas is None):
        raise ValueError("give exactly one of steps and sigmas")
    sig = jnp.asarray(make_sigmas(steps, schedule, shift) if sigmas is None else np.asarray(sigmas, np.float32))
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, n)
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"sample {len(sig) - 1} steps", disable=not progress):
        sl = slice(start, start + batch_size)
        pad = batch_size - len(noise[sl])

        def padded(a, sl=sl, pad=pad):
            a = a[sl]
            return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

        ue, up = (u_embeds, u_pooled) if len(u_embeds) == 1 else (padded(u_embeds), padded(u_pooled))
        x = _sample_batch(
            graphdef,
            state,
            padded(noise),
            padded(embeds),
            padded(pooled),
            ue,
            up,
            sig,
            jnp.float32(guidance),
            cfg=cfg,
            raw=raw,
        )
        out.append(np.asarray(x)[: batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def save_samples(path: str, images: np.ndarray, digits: np.ndarray) -> None:
    """Write `.npz` with `images` float32 (N, 8, 16) in [0, 1] and `digits` int64 (N, 2)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    digits = np.asarray(digits, np.int64)
    if images.shape[1:] != data.IMAGE_SHAPE[:2] or digits.shape != (len(images), 2):
        raise ValueError(f"images must be (N, 8, 16[, 1]) and digits (N, 2), got {images.shape}, {digits.shape}")
    np.savez(path, images=np.clip(images, 0.0, 1.0), digits=digits)
