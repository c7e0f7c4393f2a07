"""Evaluation in the compositional world: a cell classifier, GenEval-like per-category scores, FD, fidelity.

- The classifier is scikit-learn's `MLPClassifier` (one hidden layer of `HIDDEN` ReLU units, fixed seed) on
  single cells (CELL x CELL x 3, in [0, 1]) of TRAINING-split scenes, stored as weights (`classifier.npz`,
  `digits.mlp`: scores do not depend on the machine); its classes are "empty" and each (digit, colour).
  `classifier_accuracy` checks it on cells of HELD-OUT scenes.
- A generated scene is read as its four cells' (digit or empty, colour) and scored against its prompt's content
  (`data.spec`): `count` (how many digits), `identity` (every named digit present, each in its own cell),
  `position` (named cells hold the named digits; position prompts only), `attribute` (named digits have the
  named colours; colour and binding prompts only), and `accuracy` = everything the prompt asks for at once
  (GenEval's per-image success). Per task: `task/<name>`.
- Fréchet distance between Gaussians fitted to the classifier's hidden features (4 cells concatenated) of the
  images and of held-out real scenes (`reference_scenes`); MSE to a reference set in pixels in [0, 1].
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import NamedTuple

import numpy as np

from flowsteer_jax.compose import data
from flowsteer_jax.digits import mlp
from flowsteer_jax.digits.data import to_unit
from flowsteer_jax.digits.evaluate import frechet_distance

HIDDEN = 64
CLASSIFIER_SEED = 0
CLASSIFIER_SCENES = 4000  # training scenes whose cells train the classifier (16,000 cells)
EVAL_SEED = 1234
REFERENCE_SEED = 4321
NUM_COLOURS = len(data.COLOURS)
_PERMUTATIONS = np.array(list(itertools.permutations(range(data.NUM_CELLS))))  # (24, 4): object j -> cell


class EvalSet(NamedTuple):
    prompts: list[str]  # N
    prompt_ids: np.ndarray  # (N,) into data.all_prompts()
    noise: np.ndarray  # (N, *latent_shape) float32, N(0, 1)


def eval_set(
    n: int, latent_shape: tuple[int, int, int], seed: int = EVAL_SEED, tasks: str | tuple[str, ...] | None = None
) -> EvalSet:
    """A fixed evaluation set: the selected tasks (`data.task_ids`, default all) equally often (as far as `n`
    allows), a random prompt of each, noise."""
    rng = np.random.default_rng(seed)
    by_task, chosen = data.task_prompts(), np.asarray(data.task_ids(tasks))
    tasks = chosen[rng.permutation(np.arange(n) % len(chosen))]
    ids = np.array([by_task[t][rng.integers(len(by_task[t]))] for t in tasks], np.int64)
    noise = rng.standard_normal((n, *latent_shape)).astype(np.float32)
    return EvalSet([data.all_prompts()[i] for i in ids], ids, noise)


def _cell_labels(cells: np.ndarray, colours: np.ndarray) -> np.ndarray:
    return np.where(cells < 0, 0, 1 + cells * NUM_COLOURS + colours)


def _cells_of(images: np.ndarray) -> np.ndarray:
    """(N, CANVAS, CANVAS, 3) in [0, 1] -> (N * 4, CELL * CELL * 3) classifier inputs."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != data.IMAGE_SHAPE:
        raise ValueError(f"expected scenes of shape (N, {', '.join(map(str, data.IMAGE_SHAPE))}), got {images.shape}")
    return data.cell_crops(images).reshape(len(images) * data.NUM_CELLS, -1)


CLASSIFIER_FILE = os.path.join(os.path.dirname(__file__), "classifier.npz")  # `digits.mlp.main` writes it


def fit_classifier() -> mlp.MLP:
    """The cell classifier as it was made: scikit-learn's MLPClassifier on cells of training-split scenes."""
    scenes = data.sample_scenes(np.random.default_rng(CLASSIFIER_SEED), CLASSIFIER_SCENES, "train")
    x, y = _cells_of(to_unit(scenes.images)), _cell_labels(scenes.cells, scenes.colours).reshape(-1)
    return mlp.fit(x, y, HIDDEN, CLASSIFIER_SEED, max_iter=300)


@functools.cache
def classifier() -> mlp.MLP:
    """The fixed cell classifier: the stored weights (`CLASSIFIER_FILE`), so scores do not depend on the machine
    or the scikit-learn version."""
    return mlp.load(CLASSIFIER_FILE, fit_classifier)


def read_cells(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cells, colours), each (N, 4): the classifier's digit (-1 = empty) and colour (-1 = empty) of each cell."""
    label = classifier().predict(_cells_of(images)).reshape(len(images), data.NUM_CELLS)
    empty = label == 0
    return np.where(empty, -1, (label - 1) // NUM_COLOURS), np.where(empty, -1, (label - 1) % NUM_COLOURS)


def features(images: np.ndarray) -> np.ndarray:
    """(N, 4 * HIDDEN) classifier hidden features (ReLU layer) of the four cells, concatenated."""
    return classifier().hidden(_cells_of(images)).reshape(len(images), -1)


def classifier_accuracy(n: int = 1000, seed: int = REFERENCE_SEED) -> dict[str, float]:
    """The classifier on cells of `n` HELD-OUT real scenes: every cell right (`cell`), digit-or-empty right
    (`digit`), colour right on non-empty cells (`colour`), all four cells of a scene right (`scene`)."""
    scenes = reference_scenes(n, seed)
    cells, colours = read_cells(to_unit(scenes.images))
    full = scenes.cells >= 0
    return dict(
        cell=float(((cells == scenes.cells) & (colours == scenes.colours)).mean()),
        digit=float((cells == scenes.cells).mean()),
        colour=float((colours == scenes.colours)[full].mean()),
        scene=float(((cells == scenes.cells) & (colours == scenes.colours)).all(1).mean()),
    )


def _matched(cells, colours, spec: data.Spec, pid, *, cell: bool, colour: bool) -> np.ndarray:
    """Whether the prompt's objects go to distinct cells holding their digit (and named cell / colour)."""
    digit = spec.digit[pid][:, :, None]  # (N, objects, 1) against (N, 1, cells)
    ok = cells[:, None, :] == digit
    if cell:
        want = spec.cell[pid][:, :, None]
        ok &= (want < 0) | (want == np.arange(data.NUM_CELLS))
    if colour:
        want = spec.colour[pid][:, :, None]
        ok &= (want < 0) | (colours[:, None, :] == want)
    ok |= digit < 0  # no object: anything
    objects = np.arange(data.NUM_CELLS)
    return ok[:, objects[None, :], _PERMUTATIONS].all(-1).any(-1)


def score(images: np.ndarray, prompt_ids: np.ndarray) -> dict[str, float]:
    """Per-category and overall prompt accuracy of (N, CANVAS, CANVAS, 3) images in [0, 1] for their prompts."""
    return score_cells(*read_cells(images), prompt_ids)


def _full(cells: np.ndarray, colours: np.ndarray, spec: data.Spec, pid: np.ndarray) -> np.ndarray:
    count = (cells >= 0).sum(1) == spec.count[pid]
    return count & _matched(cells, colours, spec, pid, cell=True, colour=True)


def correct(images: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each image satisfies everything its prompt asks (the per-image `accuracy`)."""
    return _full(*read_cells(images), data.spec(), np.asarray(prompt_ids))


def score_cells(cells: np.ndarray, colours: np.ndarray, prompt_ids: np.ndarray) -> dict[str, float]:
    """`score` of scenes read as (cells, colours), each (N, 4) with -1 = empty."""
    spec, pid = data.spec(), np.asarray(prompt_ids)
    count = (cells >= 0).sum(1) == spec.count[pid]
    identity = _matched(cells, colours, spec, pid, cell=False, colour=False)
    position = _matched(cells, colours, spec, pid, cell=True, colour=False)
    attribute = _matched(cells, colours, spec, pid, cell=False, colour=True)
    full = _full(cells, colours, spec, pid)
    task = spec.task[pid]
    is_pos, is_col = (
        task == data.TASKS.index("position"),
        np.isin(task, [data.TASKS.index(t) for t in ("colour", "binding")]),
    )
    out = dict(
        accuracy=float(full.mean()),
        count=float(count.mean()),
        identity=float(identity.mean()),
        position=float(position[is_pos].mean()) if is_pos.any() else float("nan"),
        attribute=float(attribute[is_col].mean()) if is_col.any() else float("nan"),
    )
    for t, name in enumerate(data.TASKS):
        if (task == t).any():
            out[f"task/{name}"] = float(full[task == t].mean())
    return out


def reference_scenes(n: int = 1000, seed: int = REFERENCE_SEED, tasks: str | None = None) -> data.Scenes:
    """Real scenes from HELD-OUT digits (images in [-1, 1]) for prompts of `tasks` (default all): the FD reference
    and the classifier check."""
    return data.sample_scenes(np.random.default_rng(seed), n, "test", tasks=tasks)


@functools.cache
def _reference_features(n: int, seed: int, tasks: str | None = None) -> np.ndarray:
    return features(to_unit(reference_scenes(n, seed, tasks).images))


def evaluate(
    images: np.ndarray,
    prompt_ids: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    fd_reference: tuple[int, int] = (1000, REFERENCE_SEED),
    tasks: str | None = None,
) -> dict[str, float]:
    """`score` plus `fd` (vs `reference_scenes(*fd_reference, tasks)`: real scenes of the same prompt tasks) and,
    with `reference` (same shape, [0, 1]), `mse_to_reference`: the mean over images of the mean squared pixel
    difference."""
    out = score(images, prompt_ids)
    out["fd"] = frechet_distance(features(images), _reference_features(*fd_reference, tasks or None))
    if reference is not None:
        a, b = np.asarray(images, np.float32), np.asarray(reference, np.float32)
        if a.shape != b.shape:
            raise ValueError(f"reference has shape {b.shape}, images {a.shape}")
        out["mse_to_reference"] = float(np.mean(np.square(a - b)))
    return out
