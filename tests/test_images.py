"""`images`: the sample grid layout and its atomic PNG write."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from flowsteer_jax.images import grid, save_grid


def test_grid_places_each_image_in_row_major_order():
    images = np.stack([np.full((3, 2, 1), i / 4, np.float32) for i in range(5)])
    g = grid(images, cols=2)
    assert g.shape == (3 * 5 + 2, 2 * 4 + 2, 1)
    for i in range(5):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(g[2 + r * 5 : 5 + r * 5, 2 + c * 4 : 4 + c * 4], images[i])
    assert g[0].min() == 1.0 and g[-3:, 6:].min() == 1.0  # borders and the empty sixth cell stay white


def test_save_grid_scales_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "g.png")
    save_grid(path, np.zeros((2, 4, 4, 3), np.float32), cols=2, scale=3)
    assert Image.open(path).size == (3 * (2 * 6 + 2), 3 * (6 + 2))
    assert os.listdir(tmp_path) == ["g.png"]
