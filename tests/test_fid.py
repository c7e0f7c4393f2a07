"""FID and KID: end to end against pytorch-fid's `calculate_fid_given_paths` (same random weights, PNG folders), and
`frechet_distance` / `kid` against pytorch-fid's and torch-fidelity's own functions on the same inputs."""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from conversion.errors import InputError
from flowsteer_jax.evaluation import fid as fid_mod
from flowsteer_jax.evaluation.fid import (
    fid,
    frechet_distance,
    image_files,
    kid,
    statistics,
)


def write_pngs(folder: pathlib.Path, n: int, size: tuple[int, int], seed: int, bright: int) -> None:
    """`n` noisy RGB PNGs; `bright` shifts the distribution so two folders differ."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 200, (1, 1, 3)) + bright
        img = np.clip(base + rng.integers(-40, 40, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def random_statistics(rng: np.random.Generator, n: int, d: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + shift
    return statistics(x)


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n, d in [(200, 16), (10, 24)]:  # full-rank, and rank-deficient covariances (n < d)
        mu1, s1 = random_statistics(rng, n, d, 0.0)
        mu2, s2 = random_statistics(rng, n, d, 0.3)
        want = calculate_frechet_distance(mu1, s1, mu2, s2)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float) and want > 0.1
        assert abs(got - want) <= 1e-10 * abs(want), (n, d, got, want)


def test_singular_product_takes_the_eps_retry_as_pytorch_fid(caplog):
    from pytorch_fid.fid_score import calculate_frechet_distance

    # S1 S2 = [[0, 1], [0, 0]] has no square root: sqrtm is not finite, both retry with eps on the diagonals,
    # where (S1 + eps)(S2 + eps) has the real root of a Jordan block at eps (1 + eps).
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    for eps in (1e-6, 1e-2):
        want = calculate_frechet_distance(mu1, s1, mu2, s2, eps=eps)
        with caplog.at_level(logging.WARNING, logger=fid_mod.__name__):
            got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
        assert f"adding {eps} to diagonal" in caplog.text
        assert np.isfinite(got) and abs(got - want) <= 1e-10 * abs(want), (eps, got, want)


def test_imaginary_root_is_refused_as_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu = np.zeros(3)
    s1, s2 = np.eye(3), -np.eye(3)  # S1 S2 = -I: the root is i I
    with pytest.raises(ValueError, match="Imaginary component"):
        calculate_frechet_distance(mu, s1, mu, s2)
    with pytest.raises(ValueError, match="Imaginary component 1.0"):
        frechet_distance(mu, s1, mu, s2)


def _torch_fidelity_kid(a: np.ndarray, b: np.ndarray, **kwargs) -> tuple[float, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), verbose=False, **kwargs)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(subsets=10, subset_size=30), dict(kid_subsets=10, kid_subset_size=30)),
        (
            dict(subsets=7, subset_size=25, degree=2, gamma=0.05, coef0=0.3, seed=7),
            dict(
                kid_subsets=7,
                kid_subset_size=25,
                kid_kernel_poly_degree=2,
                kid_kernel_poly_gamma=0.05,
                kid_kernel_poly_coef0=0.3,
                rng_seed=7,
            ),
        ),
    ],
)
def test_kid_matches_torch_fidelity(ours, theirs):
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_normal((60, 32)))
    b = np.abs(rng.standard_normal((45, 32))) * 1.2 + 0.1
    want_mean, want_std = _torch_fidelity_kid(a, b, **theirs)
    got_mean, got_std = kid(a, b, **ours)
    assert want_mean > 1e-3 and want_std > 0
    assert abs(got_mean - want_mean) <= 1e-10 * abs(want_mean)
    assert abs(got_std - want_std) <= 1e-10 * abs(want_std)


def test_kid_clips_the_subset_size_to_the_smaller_set():
    rng = np.random.default_rng(2)
    a, b = np.abs(rng.standard_normal((40, 8))), np.abs(rng.standard_normal((25, 8))) + 0.2
    with pytest.warns(UserWarning, match="subset_size 1000 clipped to 25"):
        got = kid(a, b, subsets=5)
    assert got == pytest.approx(_torch_fidelity_kid(a, b, kid_subsets=5, kid_subset_size=25), rel=1e-10)


def test_bad_feature_sets_are_refused():
    with pytest.raises(InputError, match="N >= 2"):
        fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(InputError, match="2 samples per set"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(InputError, match=r"\(5, 4\) and \(5, 3\)"):
        kid(np.zeros((5, 4)), np.zeros((5, 3)))


def test_image_files_are_pytorch_fids(tmp_path):
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS

    assert set(fid_mod.IMAGE_EXTENSIONS) == IMAGE_EXTENSIONS
    for name in ["b.png", "a.jpg", "c.webp", "d.PNG", "notes.txt", "e.tiff", "png", "f.jpeg"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    want = sorted(f for ext in IMAGE_EXTENSIONS for f in tmp_path.glob(f"*.{ext}") if f.is_file())
    assert image_files(str(tmp_path)) == [str(f) for f in want]
    assert [os.path.basename(f) for f in image_files(str(tmp_path))] == [
        "a.jpg",
        "b.png",
        "c.webp",
        "e.tiff",
        "f.jpeg",
    ]


def test_empty_or_missing_image_folders_are_named(tmp_path):
    (tmp_path / "X.PNG").write_bytes(b"")
    with pytest.raises(InputError, match=rf"{tmp_path}: no image files .*1 with upper-case extensions"):
        image_files(str(tmp_path))
    with pytest.raises(InputError, match="no such image folder"):
        image_files(str(tmp_path / "missing"))
