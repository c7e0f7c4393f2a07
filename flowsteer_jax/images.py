"""Image grids: NHWC images in [0, 1] -> one PNG (the trainer's sample grids, the digits report)."""

from __future__ import annotations

import os

import numpy as np

GRID = "grid.png"  # `flowsteer_jax.sample`'s grid of its images, beside them: not one of them (`evaluate --images`)


def grid(images: np.ndarray, cols: int, border: int = 2) -> np.ndarray:
    """NHWC images -> one HWC image, `cols` per row, separated and framed by `border` white pixels."""
    n, h, w, c = images.shape
    rows, b = -(-n // cols), border
    out = np.ones((rows * (h + b) + b, cols * (w + b) + b, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[b + r * (h + b) : b + r * (h + b) + h, b + q * (w + b) : b + q * (w + b) + w] = img
    return out


def save_png(path: str, image) -> None:
    """A PIL image to `path` through a temporary sibling and a rename: a full disk or a kill mid-write leaves the
    old file (if any) whole and no partial file behind."""
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        image.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(path: str, images: np.ndarray, cols: int = 4, scale: int = 1, border: int = 2) -> np.ndarray:
    """NHWC images in [0, 1] -> one PNG grid, each pixel `scale` x `scale` (written atomically); its RGB uint8 HWC
    pixels back (for TensorBoard)."""
    from PIL import Image

    pixels = np.round(grid(images, cols, border) * 255).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, 0).repeat(scale, 1)
    save_png(path, Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels
