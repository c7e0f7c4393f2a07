"""FID and KID on pytorch-fid's InceptionV3 pool3 features, computed in JAX (features) and float64 numpy (metrics).

- `InceptionFeatures.from_weights(folder)` loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (converted
  once to `.safetensors` beside it by `conversion.torch_files`; the conversion alone needs torch) and maps images
  to (N, 2048) float64 features as pytorch-fid's `get_activations` does: PIL -> RGB -> `ToTensor` ([0, 1]) ->
  bilinear 299x299 -> `2x - 1` -> InceptionV3 -> pool3.
- `frechet_distance` is pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`, the `eps` retry, the
  imaginary-part check); `statistics` its mean and `np.cov(rowvar=False)`.
- `kid` is torch-fidelity's `kid_features_to_metric`: the unbiased MMD^2 with the polynomial kernel
  `(gamma x.y + coef0)^degree` over `subsets` random subsets drawn by `np.random.RandomState(seed)`.

Nothing is downloaded: a missing weight file is an `InputError` naming the folder, the file and where to get it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from PIL import Image
from safetensors import safe_open
from scipy import linalg

from conversion import inception as inception_conv
from conversion import torch_files
from conversion.errors import InputError
from flowsteer_jax.models.inception import InceptionV3, jit_forward, load_inception, resize_bilinear

log = logging.getLogger(__name__)

WEIGHT_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file; its .safetensors conversion accepted too
WEIGHT_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHT_NAME
# torch.hub's convention: the name carries the first hex digits of the file's sha256.
PUBLISHED_SHA256_PREFIX = WEIGHT_NAME.rsplit("-", 1)[1].split(".")[0]
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's


class InceptionFeatures:
    """Images -> (N, 2048) float64 pool3 features of pytorch-fid's FID InceptionV3.

    Batches have a fixed size (`batch_size`; the last one is padded) so the network compiles once; images of
    different sizes are resized per size group before they join a batch, so sizes cost only a small resize compile.
    """

    key = "inception"

    def __init__(self, model: InceptionV3, provenance: dict, *, batch_size: int = 50) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}: must be at least 1")
        self.model, self.provenance, self.batch_size = model, provenance, batch_size
        self._net = jit_forward(model, resize=False)
        size = (inception_conv.RESIZE, inception_conv.RESIZE)
        self._resize = jax.jit(lambda x: 2 * resize_bilinear(x, size) - 1)

    @classmethod
    def from_weights(cls, weights_dir: str, *, batch_size: int = 50) -> InceptionFeatures:
        """Load `weights_dir/pt_inception-2015-12-05-6726825d.safetensors`, converting the `.pth` beside it first
        when there is no `.safetensors` yet (needs torch once)."""
        pth = os.path.join(weights_dir, WEIGHT_NAME)
        converted = torch_files.safetensors_path(pth)
        if not os.path.isdir(weights_dir):
            raise InputError(f"{weights_dir}: no such weights folder (expected {WEIGHT_NAME} in it, from {WEIGHT_URL})")
        if not os.path.isfile(converted):
            if not os.path.isfile(pth):
                raise InputError(
                    f"{weights_dir}: no {WEIGHT_NAME} (nor its conversion {os.path.basename(converted)}); "
                    f"download it from {WEIGHT_URL} into that folder"
                )
            log.info("converting %s to %s (once)", pth, converted)
            torch_files.convert(pth)
        model = load_inception(converted)
        with safe_open(converted, framework="np") as f:
            meta = f.metadata() or {}
        source_sha = meta.get("source_sha256")
        provenance = {
            "features": "pytorch-fid InceptionV3 pool3 (2048)",
            "weights": os.path.basename(converted),
            "sha256": torch_files.sha256(converted),
            "source": meta.get("source", WEIGHT_NAME),
            "source_sha256": source_sha,
            "published_weights": None if source_sha is None else source_sha.startswith(PUBLISHED_SHA256_PREFIX),
            "resize": "299x299 bilinear (torch F.interpolate, align_corners=False, no antialias)",
            "input": "RGB in [0, 1] (PIL -> ToTensor), scaled to [-1, 1]",
        }
        if provenance["published_weights"] is False:
            warnings.warn(
                f"{converted}: converted from a file whose sha256 ({source_sha[:16]}...) does not start with "
                f"{PUBLISHED_SHA256_PREFIX}: not pytorch-fid's published weights, scores are not comparable",
                stacklevel=2,
            )
        return cls(model, provenance, batch_size=batch_size)

    def __call__(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """(N, 2048) float64 features, in input order. `images`: PIL images (any mode, converted to RGB), or
        (N, H, W, 3) / a sequence of (H, W, 3) arrays, uint8 (divided by 255) or float in [0, 1]."""
        out = np.empty((len(images), inception_conv.FEATURES), np.float64)
        rows: list[np.ndarray] = []  # resized images waiting for a full batch
        where: list[int] = []
        for indices, batch in self._resized_groups(images):
            rows.append(batch)
            where += indices
            while len(where) >= self.batch_size:
                self._flush(rows, where, out, self.batch_size)
        if where:
            self._flush(rows, where, out, len(where))
        return out

    def _resized_groups(self, images: Sequence) -> Iterator[tuple[list[int], np.ndarray]]:
        """(input indices, their 299x299 images in [-1, 1]) per chunk of at most `batch_size` same-size images.

        Pixels are read chunk by chunk, so a lazy sequence (`ImageFiles`) is never held in memory whole.
        """
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(images)):
            by_size.setdefault(_size(images, i), []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                x = np.stack([_to_float_rgb(images[i], i) for i in chunk])
                x = np.pad(x, ((0, self.batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)))  # one compile per size
                yield chunk, np.asarray(self._resize(x))[: len(chunk)]

    def _flush(self, rows: list[np.ndarray], where: list[int], out: np.ndarray, n: int) -> None:
        batch = np.concatenate(rows)
        x = np.pad(batch[:n], ((0, self.batch_size - n), (0, 0), (0, 0), (0, 0)))
        out[where[:n]] = np.asarray(self._net(x))[:n]
        rows[:] = [batch[n:]] if len(batch) > n else []
        del where[:n]


class ImageFiles(Sequence):
    """Image files as a lazy sequence of PIL images (opened when indexed), for `InceptionFeatures` on a folder."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as im:  # closed here: a folder of 50k files must not hold 50k handles
            return im.convert("RGB")  # pytorch-fid's ImagePathDataset

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) from the file's header, without decoding its pixels."""
        with Image.open(self.files[i]) as im:
            return im.size[::-1]


def _size(images: Sequence, i: int) -> tuple[int, ...]:
    if isinstance(images, ImageFiles):
        return images.size(i)
    image = images[i]
    if isinstance(image, Image.Image):
        return image.size[::-1]
    return tuple(np.shape(image)[:2])


def _to_float_rgb(image: Image.Image | np.ndarray, index: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1], as torchvision's `ToTensor` after `Image.convert("RGB")` (uint8 / 255)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f"image {index}: shape {a.shape}, expected (H, W, 3) RGB")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"image {index}: dtype {a.dtype}, expected uint8 or float in [0, 1]")
    if a.size and (a.min() < 0 or a.max() > 1):  # [-1, 1] or [0, 255] floats would score silently wrong
        raise InputError(f"image {index}: values in [{a.min():.3g}, {a.max():.3g}], expected [0, 1]")
    return a.astype(np.float32)


def image_files(folder: str) -> list[str]:
    """The image files pytorch-fid reads from `folder`: its extensions (lower case, as its glob matches), sorted."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    names = sorted(os.listdir(folder))
    files = [
        os.path.join(folder, n)
        for n in names
        if n.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and "." in n and os.path.isfile(os.path.join(folder, n))
    ]
    if not files:
        upper = [n for n in names if "." in n and n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        hint = f" ({len(upper)} with upper-case extensions, which pytorch-fid ignores too)" if upper else ""
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return files


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (`np.cov(rowvar=False)`) of (N, D) features, float64, as pytorch-fid."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"features of shape {f.shape}: need (N, D) with N >= 2")
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): pytorch-fid's `calculate_frechet_distance` step for step.

    When `sqrtm(S1 S2)` is not finite (a singular product), `eps` is added to both diagonals and it is retried.
    A complex root whose diagonal's imaginary part exceeds 1e-3 raises ValueError; a smaller one is dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"statistics of different sizes: means {mu1.shape} {mu2.shape}, {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    # scipy's `sqrtm(A, disp=False)` (pytorch-fid's call) returns the same root; the argument is deprecated, and
    # the singular-matrix warning it silenced is silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            log.warning("fid calculation produces singular product; adding %s to diagonal of cov estimates", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets (any N >= 2 each)."""
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """torch-fidelity's `mmd2(..., mmd_est="unbiased")`: within-set sums without the diagonal, cross term whole."""
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    k_xy_sum = k_xy.sum(axis=0).sum()
    return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy_sum / (m * m)


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """KID (mean, std over subsets) as torch-fidelity's `kid_features_to_metric` with the polynomial kernel.

    Computed in float64. Where a set has fewer than `subset_size` rows, the subsets shrink to the smaller set (a
    warning; torch-fidelity refuses instead), which keeps small evaluations possible but is a different estimate.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"features of shapes {a.shape} and {b.shape}: need (N, D) and (M, D)")
    if subsets < 1:
        raise InputError(f"subsets={subsets}: must be at least 1")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise InputError(f"KID needs 2 samples per set at least (have {len(a)}, {len(b)}; subset_size={subset_size})")
    if m < subset_size:
        warnings.warn(
            f"KID subset_size {subset_size} clipped to {m} (sets of {len(a)} and {len(b)} features)", stacklevel=2
        )
    g = 1.0 / a.shape[1] if gamma is None else gamma

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (np.matmul(x, y.T) * g + coef0) ** degree

    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        mmds[i] = _mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
    return float(np.mean(mmds)), float(np.std(mmds))
