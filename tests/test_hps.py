"""HPSv2 scorer: parity with HPSv2's own pipeline (its fork's eval transform in torchvision + open_clip's model and
tokenizer) on a tiny random open_clip CLIP, weight-file discovery, and the CLIP tokenizer equal to open_clip's."""

from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as F
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor
from transformers import CLIPTokenizer

from conversion.errors import InputError
from flowsteer_jax.evaluation.hps import WEIGHT_NAMES, HPSScorer, preprocess
from tests.eval_weights import save_hps

SIZE = 32
TINY = {  # the real vocabulary and context (the tokenizers are compared end to end), tiny widths
    "embed_dim": 24,
    "quick_gelu": False,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A Cozy Cabin, snowy forest; 4K, trending on ArtStation!!",
    "portrait of a café owner — oil painting, 1890s, Renoir's style",
    " ".join(f"word{i}" for i in range(60)) + " and a very long tail that open_clip truncates",
    "salt &amp; pepper,  ＦＵＬＬＷＩＤＴＨ\ttext",  # open_clip's html/ftfy cleaning
]


@pytest.fixture(scope="module")
def clip_bpe_tokenizer() -> CLIPTokenizer:
    """A transformers CLIPTokenizer from open_clip's bundled BPE, with the vocabulary open_clip's SimpleTokenizer
    builds (bytes, bytes + `</w>`, merges, then SOT/EOT), under the OpenAI/HF names of the two special tokens."""
    start = time.perf_counter()
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=77)
    print(f"49408-token CLIPTokenizer built in {time.perf_counter() - start:.2f} s")
    return tok


def test_clip_tokenizer_equals_open_clip(clip_bpe_tokenizer):
    """Backs serving HPS with SD3's CLIP-L tokenizer folder: the same BPE gives the same ids as open_clip."""
    from flowsteer_jax.evaluation.hps import tokenize

    want = open_clip.get_tokenizer("ViT-H-14")(PROMPTS).numpy()
    got = tokenize(clip_bpe_tokenizer, PROMPTS, 77)
    assert (want[:, -1] != 0).tolist() == [False, False, False, True, False]  # the last prompt is truncated
    np.testing.assert_array_equal(got, want)


class ResizeMaxSize(torch.nn.Module):
    """HPSv2's open_clip fork (hpsv2/src/open_clip/transform.py), verbatim in behaviour: on a CHW tensor."""

    def __init__(self, max_size: int, fill: int = 0):
        super().__init__()
        self.max_size, self.fill = max_size, fill

    def forward(self, img):
        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = F.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = F.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill)
        return img


def hps_transform(size: int) -> Compose:
    """HPSv2's `image_transform(size, is_train=False, resize_longest_max=True)` for RGB images."""
    return Compose(
        [
            lambda im: im.convert("RGB"),
            ToTensor(),
            ResizeMaxSize(size),
            Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )


def images(seed: int = 0) -> list[Image.Image]:
    """Smooth random images (bicubic detail the resize must get right), non-square, smaller and larger than SIZE."""
    r = np.random.default_rng(seed)
    out = []
    for w, h, mode in [(70, 45, "RGB"), (20, 37, "RGB"), (48, 48, "L"), (33, 90, "RGB"), (23, 17, "RGB")]:
        small = r.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode))
    return out


def test_preprocess_matches_hpsv2_transform():
    transform = hps_transform(SIZE)
    for img in images():
        want = transform(img).permute(1, 2, 0).numpy()
        got = preprocess(img, SIZE)
        assert got.shape == want.shape == (SIZE, SIZE, 3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # float resize: PIL "F" vs torch's AA kernel
    # Longest side already SIZE, not square: upstream passes it on unpadded (its model then fails); we pad it.
    img = Image.fromarray(np.full((20, SIZE, 3), 200, np.uint8))
    want = Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)(F.pad(ToTensor()(img), [0, 6, 0, 6]))
    np.testing.assert_allclose(preprocess(img, SIZE), want.permute(1, 2, 0).numpy(), atol=1e-6)


def test_scores_match_hpsv2(tmp_path, clip_bpe_tokenizer):
    ref = save_hps(tmp_path, WEIGHT_NAMES[0], TINY, seed=0)  # v2.1
    save_hps(tmp_path, WEIGHT_NAMES[1], TINY, seed=1)  # v2.0, other weights: must not be picked
    scorer = HPSScorer.from_weights(str(tmp_path), clip_bpe_tokenizer, batch_size=2, config=TINY)
    assert os.path.isfile(tmp_path / "HPS_v2.1_compressed.safetensors")
    assert not os.path.exists(tmp_path / "HPS_v2_compressed.safetensors")  # only the chosen file is converted
    imgs = images()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(imgs))]
    got = scorer(imgs, prompts)  # 5 images in batches of 2: the last batch padded
    transform, tokenizer = hps_transform(SIZE), open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():  # HPSv2's img_score.py, one image at a time
        want = []
        for img, prompt in zip(imgs, prompts, strict=True):
            image_features = ref.encode_image(transform(img)[None], normalize=True)
            text_features = ref.encode_text(tokenizer([prompt]), normalize=True)
            want.append(torch.diagonal(image_features @ text_features.T).item())
    want = np.array(want)
    err = np.abs(got - want) / np.abs(want)
    print(f"HPS scores {np.round(got, 5)}; per-image relative error {err}")
    assert got.dtype == np.float64 and got.shape == (5,)
    assert err.max() <= 1e-5, err
    assert len(set(np.round(got, 6))) == 5  # distinct images and prompts give distinct scores
    p = scorer.provenance
    assert p["version"] == "v2.1" and p["weights"] == "HPS_v2.1_compressed.safetensors"
    assert p["source"] == WEIGHT_NAMES[0] and len(p["source_sha256"]) == len(p["weights_sha256"]) == 64
    assert p["image_size"] == SIZE
    json.dumps(p)
    # Reused: the converted file is found again; an image-prompt count mismatch is refused.
    assert np.array_equal(
        HPSScorer.from_weights(str(tmp_path), clip_bpe_tokenizer, batch_size=2, config=TINY)(imgs[:1], prompts[:1]),
        got[:1],
    )
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer(imgs, prompts[:4])


def test_v2_only_and_missing_weights(tmp_path, clip_bpe_tokenizer):
    with pytest.raises(InputError) as e:
        HPSScorer.from_weights(str(tmp_path), clip_bpe_tokenizer, config=TINY)
    assert str(tmp_path) in str(e.value) and all(n in str(e.value) for n in WEIGHT_NAMES)
    save_hps(tmp_path, WEIGHT_NAMES[1], TINY, seed=1)
    scorer = HPSScorer.from_weights(str(tmp_path), clip_bpe_tokenizer, config=TINY)
    assert scorer.provenance["version"] == "v2.0" and scorer.provenance["source"] == WEIGHT_NAMES[1]
    with pytest.raises(InputError, match="not a directory"):
        HPSScorer.from_weights(str(tmp_path / "nope"), clip_bpe_tokenizer, config=TINY)
