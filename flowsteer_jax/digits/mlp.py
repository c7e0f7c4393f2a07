"""The toy worlds' scoring classifiers as fixed weights: an MLP (one ReLU hidden layer) stored in the package.

A metric must not move with the machine: a scikit-learn `MLPClassifier` fitted at run time depends on the
scikit-learn and numpy versions and on the CPU's BLAS kernels (the digits classifier scored 0.954 here and 0.965
elsewhere on the same held-out pairs). So each world's classifier is fitted once, its weights are stored next to
its code (`<world>/classifier.npz`), and scoring is numpy's float64 matmuls on them. `fit` is how they were made;
`python -m flowsteer_jax.digits.mlp` refits and rewrites both files (then the README's numbers must be
regenerated).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class MLP(NamedTuple):
    w1: np.ndarray  # (D, H)
    b1: np.ndarray  # (H,)
    w2: np.ndarray  # (H, C)
    b2: np.ndarray  # (C,)
    classes: np.ndarray  # (C,) the label of each output

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """(N, H) ReLU features (float64)."""
        return np.maximum(np.asarray(x, np.float64) @ self.w1 + self.b1, 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) the most likely label of each row."""
        return self.classes[np.argmax(self.hidden(x) @ self.w2 + self.b2, axis=1)]


def fit(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, max_iter: int) -> MLP:
    """scikit-learn's `MLPClassifier` (adam, ReLU, softmax) on one BLAS thread, as stored weights."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    # One BLAS thread: after JAX has run, a multi-threaded fit of these small matrices ran 6x slower.
    with threadpool_limits(1):
        clf.fit(x, y)
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    return MLP(*(np.asarray(a, np.float64) for a in (w1, b1, w2, b2)), np.asarray(clf.classes_))


def save(path: str, m: MLP) -> None:
    np.savez(path, **m._asdict())


def load(path: str, refit: Callable[[], MLP]) -> MLP:
    """The stored classifier at `path`; if the file is missing (a checkout without it), `refit()` once."""
    if not os.path.isfile(path):
        return refit()
    with np.load(path) as f:
        return MLP(**{k: f[k] for k in MLP._fields})


def main() -> int:
    from flowsteer_jax.compose import evaluate as compose_evaluate
    from flowsteer_jax.digits import evaluate as digits_evaluate

    for module in (digits_evaluate, compose_evaluate):
        save(module.CLASSIFIER_FILE, module.fit_classifier())
        print("wrote", module.CLASSIFIER_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
