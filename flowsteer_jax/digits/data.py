"""Digit pairs from scikit-learn's `load_digits` (1,797 8x8 images, values 0..16).

An image is two digits side by side: (8, 16, 1) channels-last, scaled to [-1, 1] by `x / 8 - 1`; it is also the
"latent" (the digits world's VAE is identity). A fixed, seeded, stratified split holds out ~30% of the single
digits for evaluation only; teacher pretraining and the classifier use the rest. Prompts name both digits and
their places in one of `NUM_PHRASINGS` phrasings, numerals or words (`prompt_for`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "test")
HELD_OUT_FRACTION = 0.3
SPLIT_SEED = 0
IMAGE_SHAPE = (8, 16, 1)  # (height, width, channels) of a pair
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = (
    "a {l} on the left and a {r} on the right",
    "a {r} on the right and a {l} on the left",
    "{l} then {r}",
    "left {l} right {r}",
    "{lw} on the left and {rw} on the right",
    "{rw} on the right and {lw} on the left",
    "{lw} then {rw}",
    "left {lw} right {rw}",
)
NUM_PHRASINGS = len(PHRASINGS)
UNCONDITIONAL = ""  # the empty prompt is the unconditional one (CFG)


class Pairs(NamedTuple):
    images: np.ndarray  # (N, 8, 16, 1) float32 in [-1, 1]
    digits: np.ndarray  # (N, 2) int64: (left, right)
    prompts: list[str]  # N prompts


def prompt_for(left: int, right: int, phrasing: int) -> str:
    """The prompt naming `left` and `right` in phrasing `phrasing` (0 <= phrasing < NUM_PHRASINGS)."""
    if not (0 <= left <= 9 and 0 <= right <= 9):
        raise ValueError(f"digits must be in 0..9, got ({left}, {right})")
    if not 0 <= phrasing < NUM_PHRASINGS:
        raise ValueError(f"phrasing must be in 0..{NUM_PHRASINGS - 1}, got {phrasing}")
    return PHRASINGS[phrasing].format(l=left, r=right, lw=WORDS[left], rw=WORDS[right])


def prompt_index(left, right, phrasing):
    """Index of `prompt_for(left, right, phrasing)` in `all_prompts()` (0 is the empty prompt); works on arrays."""
    return 1 + (left * 10 + right) * NUM_PHRASINGS + phrasing


@functools.cache
def all_prompts() -> tuple[str, ...]:
    """Every prompt of the world: "" first, then (left, right, phrasing) in row-major order (`prompt_index`)."""
    out = [UNCONDITIONAL]
    for left in range(10):
        for right in range(10):
            out += [prompt_for(left, right, p) for p in range(NUM_PHRASINGS)]
    return tuple(out)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)  # (1797, 8, 8), 0..16
    images.setflags(write=False)
    target = d.target.astype(np.int64)
    target.setflags(write=False)
    return images, target


@functools.cache
def split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of the split: fixed (seed `SPLIT_SEED`), stratified, disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.model_selection import train_test_split

    _, target = _digits()
    train, test = train_test_split(
        np.arange(len(target)), test_size=HELD_OUT_FRACTION, stratify=target, random_state=SPLIT_SEED
    )
    out = np.sort(train if split == "train" else test)
    out.setflags(write=False)
    return out


def single_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in 0..16, labels (N,) int64) of the split."""
    images, target = _digits()
    idx = split_indices(split)
    return images[idx], target[idx]


def scale(images: np.ndarray) -> np.ndarray:
    """Raw 0..16 pixel values -> [-1, 1] (`x / 8 - 1`)."""
    return np.asarray(images, np.float32) / 8.0 - 1.0


def to_unit(images):
    """[-1, 1] -> [0, 1] (clipped). Works on numpy and jax arrays."""
    return ((images + 1.0) / 2.0).clip(0.0, 1.0)


def from_unit(images):
    """[0, 1] -> [-1, 1], the inverse of `to_unit` on its range."""
    return images * 2.0 - 1.0


def make_pairs(left_images: np.ndarray, right_images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) raw 0..16 left and right digits -> (N, 8, 16, 1) pair images in [-1, 1]."""
    return scale(np.concatenate([left_images, right_images], axis=-1))[..., None]


def sample_pairs(rng: np.random.Generator, n: int, split: str = "train", digits: np.ndarray | None = None) -> Pairs:
    """`n` random pairs from `split`: digits uniform over 0..9 (or the given (n, 2) `digits`), a random image
    of each digit from the split, and a random phrasing."""
    images, labels = single_digits(split)
    if digits is None:
        digits = rng.integers(0, 10, size=(n, 2))
    digits = np.asarray(digits, np.int64)
    if digits.shape != (n, 2):
        raise ValueError(f"digits must have shape ({n}, 2), got {digits.shape}")
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    pick = np.stack([[by_class[d][rng.integers(len(by_class[d]))] for d in row] for row in digits]).reshape(n, 2)
    phrasing = rng.integers(0, NUM_PHRASINGS, size=n)
    prompts = [prompt_for(int(a), int(b), int(p)) for (a, b), p in zip(digits, phrasing, strict=True)]
    return Pairs(make_pairs(images[pick[:, 0]], images[pick[:, 1]]), digits, prompts)
