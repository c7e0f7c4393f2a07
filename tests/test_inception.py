"""FID InceptionV3: pool3 parity with pytorch-fid's `InceptionV3([3])` (random weights written as its .pth, loaded
from disk on both sides), the torch-matching resize and pooling, and strict key errors of the converter."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from conversion import inception as inception_conv
from conversion import torch_files
from conversion.errors import ConversionError, InputError
from flowsteer_jax.evaluation.fid import WEIGHT_NAME, InceptionFeatures
from flowsteer_jax.models.inception import (
    avg_pool_exclude_pad,
    bilinear_matrix,
    jit_forward,
    load_inception,
    resize_bilinear,
)
from tests.eval_weights import patch_download, random_fid_inception, write_inception
from tests.torch_reference import rel_err, to_np


def reference_inception(folder: str, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """pytorch-fid's `InceptionV3([3])` with `folder`'s weights."""
    import pytorch_fid.inception as pfi

    patch_download(folder, monkeypatch)
    return pfi.InceptionV3([3]).eval()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("inception_weights"))
    write_inception(folder)
    return folder


@pytest.fixture(scope="module")
def features(weights_dir) -> InceptionFeatures:
    """Loaded through `from_weights`, which converts the .pth once."""
    assert not os.path.exists(os.path.join(weights_dir, "pt_inception-2015-12-05-6726825d.safetensors"))
    with pytest.warns(UserWarning, match="not pytorch-fid's published weights"):  # random weights, hash differs
        return InceptionFeatures.from_weights(weights_dir, batch_size=2)


def test_pool3_parity_with_pytorch_fid(weights_dir, features, monkeypatch):
    ref = reference_inception(weights_dir, monkeypatch)
    rng = np.random.default_rng(0)
    # smaller than 299 and non-square, exactly 299, larger and non-square; interleaved so grouping must reorder
    sizes = [(90, 120), (341, 400), (299, 299), (90, 120), (341, 400)]
    images = [rng.random((h, w, 3), dtype=np.float32) for h, w in sizes]
    got = features(images)
    want = np.empty_like(got)
    with torch.no_grad():
        for i, img in enumerate(images):
            want[i] = to_np(ref(torch.from_numpy(img.transpose(2, 0, 1)[None]))[0]).reshape(-1)
    assert got.shape == (5, 2048) and got.dtype == np.float64
    errs = [rel_err(got[i], want[i]) for i in range(len(images))]
    print("pool3 rel err per image " + ", ".join(f"{s}: {e:.2e}" for s, e in zip(sizes, errs, strict=True)))
    print(f"feature scale: mean {want.mean():.3g}, max {want.max():.3g}")
    assert want.std() > 0.05 * np.abs(want).mean()  # features vary: not a degenerate net
    assert max(errs) <= 1e-5, errs
    # The provenance names the file and the converted source.
    prov = features.provenance
    assert prov["source_sha256"] == torch_files.sha256(os.path.join(weights_dir, WEIGHT_NAME))
    assert prov["published_weights"] is False  # random weights: the name's hash prefix does not match
    assert prov["weights"] == "pt_inception-2015-12-05-6726825d.safetensors" and len(prov["sha256"]) == 64


def test_uint8_and_pil_inputs_equal_float(features):
    from PIL import Image

    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    as_float = features(u8.astype(np.float32) / 255)
    np.testing.assert_array_equal(features(u8), as_float)
    np.testing.assert_array_equal(features([Image.fromarray(u8[0]), Image.fromarray(u8[1]).convert("RGBA")]), as_float)
    # The module's own forward (resize inside one jit) agrees with the batched resize-then-network path.
    whole = jit_forward(features.model)(jnp.asarray(u8, jnp.float32) / 255)
    assert whole.shape == (2, 2048) and rel_err(whole, as_float) <= 1e-6


def test_bad_images_are_refused(features):
    with pytest.raises(InputError, match=r"image 1: values in \[-1"):
        features([np.zeros((8, 8, 3), np.float32), -np.ones((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match=r"image 0: shape \(8, 8\)"):
        features([np.zeros((8, 8), np.float32)])


@pytest.mark.parametrize("n", [3, 17, 29, 299, 450, 600, 1000])
def test_resize_weights_equal_torch_bit_for_bit(n):
    # Interpolating one-hot rows reads torch's weights exactly (w * 1 + w' * 0).
    eye = torch.eye(n).reshape(1, n, 1, n)
    want = to_np(F.interpolate(eye, size=(1, 299), mode="bilinear", align_corners=False))[0, :, 0, :].T
    np.testing.assert_array_equal(bilinear_matrix(n, 299), want)


@pytest.mark.parametrize("size", [(17, 29), (299, 299), (600, 450), (299, 1000), (3, 2)])
def test_resize_matches_torch_interpolate(size):
    x = np.random.default_rng(2).random((2, 3, *size), dtype=np.float32)
    want = to_np(F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False))
    got = np.asarray(resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299))).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() <= 3e-7  # the weights are torch's; only the summation order differs
    if size[0] > 299:  # downsampling: jax.image.resize's default antialiasing is not torch's
        aa = jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (2, 299, 299, 3), "bilinear")
        assert np.abs(np.asarray(aa).transpose(0, 3, 1, 2) - want).max() > 1e-3


def test_avg_pool_excludes_padding_as_torch():
    x = np.random.default_rng(3).standard_normal((2, 4, 7, 5), dtype=np.float32)
    want = to_np(F.avg_pool2d(torch.from_numpy(x), kernel_size=3, stride=1, padding=1, count_include_pad=False))
    got = np.asarray(avg_pool_exclude_pad(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_table_covers_the_state_dict_exactly():
    state = random_fid_inception().state_dict()
    table = {e.torch_key: e.torch_shape for e in inception_conv.param_table()}
    used = {k: tuple(v.shape) for k, v in state.items() if k not in inception_conv.SKIPPED}
    assert table == used
    assert set(state) - set(used) == {k for k in inception_conv.SKIPPED if k in state}
    assert {"fc.weight", "fc.bias"} <= set(state) - set(used)


@pytest.fixture
def converted(features, weights_dir, tmp_path) -> str:
    """A private copy of the converted weights to edit."""
    src = os.path.join(weights_dir, "pt_inception-2015-12-05-6726825d.safetensors")
    dst = str(tmp_path / "inception.safetensors")
    save_file(load_file(src), dst)
    return dst


def _rewrite(path: str, edit) -> None:
    save_file(edit(load_file(path)), path)


def test_missing_extra_and_misshaped_keys_are_named_together(converted):
    gone, extra = "Mixed_6c.branch7x7dbl_3.bn.running_var", "AuxLogits.conv0.conv.weight"
    bad = "Conv2d_1a_3x3.conv.weight"

    def edit(s):
        s = {k: v for k, v in s.items() if k != gone}
        return {**s, extra: np.zeros((128, 768, 1, 1), np.float32), bad: np.zeros((32, 3, 5, 5), np.float32)}

    _rewrite(converted, edit)
    with pytest.raises(ConversionError) as e:
        load_inception(converted)
    msg = str(e.value)
    assert f"missing key '{gone}'" in msg
    assert f"unknown key '{extra}' in {converted}" in msg
    assert f"shape mismatch for '{bad}' in {converted}: file has (32, 3, 5, 5)" in msg


@pytest.mark.parametrize("key", ["fc.weight", "Mixed_5b.branch1x1.bn.num_batches_tracked"])
def test_skipped_keys_may_be_absent(converted, key):
    _rewrite(converted, lambda s: {k: v for k, v in s.items() if k != key})
    model = load_inception(converted)
    assert model.Mixed_5b.branch1x1.conv.kernel.shape == (1, 1, 192, 64)


def test_an_unskipped_fc_key_is_unknown(converted):
    _rewrite(converted, lambda s: {**s, "fc.scale": np.ones((3,), np.float32)})
    with pytest.raises(ConversionError, match="unknown key 'fc.scale'"):
        load_inception(converted)


def test_missing_weights_name_folder_and_file(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: no {WEIGHT_NAME}"):
        InceptionFeatures.from_weights(str(tmp_path))
    with pytest.raises(InputError, match="no such weights folder"):
        InceptionFeatures.from_weights(str(tmp_path / "nope"))
