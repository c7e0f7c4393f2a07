"""CLIP score and PickScore: parity with torchmetrics' CLIPScore and the PickScore README formula (transformers),
preprocessing against transformers' PIL-backend CLIPImageProcessor, and the folder errors.

The folders are tiny random `transformers.CLIPModel`s saved with `save_pretrained` beside a `CLIPProcessor` with the
in-code tokenizer, so they look like the Hub's. The references get `backend="pil"`: transformers 5.x would otherwise
pick its torchvision backend, whose bicubic resize is not PIL's (the one the references' published numbers used).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPProcessor
from transformers import CLIPModel as TorchCLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from conversion.errors import InputError
from flowsteer_jax.evaluation.clip_scores import (
    CLIP_FOLDER,
    PICKSCORE_FOLDER,
    PICKSCORE_PROCESSOR_FOLDER,
    ClipScorer,
    ImagePreprocessing,
    PickScorer,
)
from tests.eval_weights import IMAGE_SIZE, MAX_POSITIONS, save_processor, tiny_clip
from tests.torch_reference import rel_err, to_np

# (height, width): non-square both ways, smaller and larger than the model's 32, one exactly 32, odd sizes.
SIZES = [(50, 70), (20, 45), (97, 33), (32, 32), (64, 64), (33, 100), (17, 19)]
PROMPTS = ["a photo of a cat", "a red cube", "the blue sphere", "a dog on the cube", "digit", "a cat and a dog", "red"]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> str:
    """`<root>/openai-weights/` (torchmetrics accepts only paths containing "openai") holding the CLIP-L folder, a
    PickScore_v1 folder without processor and the ViT-H-14 folder its processor comes from."""
    root = tmp_path_factory.mktemp("scores") / "openai-weights"
    tiny_clip(0).save_pretrained(root / CLIP_FOLDER)
    save_processor(root / CLIP_FOLDER)
    tiny_clip(1).save_pretrained(root / PICKSCORE_FOLDER)
    save_processor(root / PICKSCORE_PROCESSOR_FOLDER)
    return str(root)


def images(seed: int = 0) -> list[Image.Image]:
    """Smooth gradients plus noise, so resampling matters, in several sizes and aspect ratios."""
    r = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([255 * yy / h, 255 * xx / w, 127 + 60 * np.sin(xx / 3 + yy / 5)], axis=-1)
        out.append(Image.fromarray(np.clip(base + r.normal(0, 25, base.shape), 0, 255).astype(np.uint8)))
    return out


def uint8_chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


class FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9.0 expects `get_*_features` to return tensors, as transformers 4.x did; 5.x returns a
    ModelOutput whose `pooler_output` is that tensor. Only the return type is adapted."""

    def __init__(self, model: TorchCLIPModel):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.inner.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.inner.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_matches_torchmetrics(weights_dir):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    folder = os.path.join(weights_dir, CLIP_FOLDER)
    ims = images()
    scorer = ClipScorer.from_weights(weights_dir, batch_size=4)  # 7 images: the last batch is padded
    ours = scorer(ims, PROMPTS)
    cos = scorer.cosine(ims, PROMPTS)
    assert ours.shape == (len(ims),) and ours.dtype == np.float64

    metric = CLIPScore(model_name_or_path=folder)
    metric.processor = CLIPProcessor.from_pretrained(folder, backend="pil")
    metric.model = FeaturesAsTensors(metric.model)
    tensors = [uint8_chw(im) for im in ims]
    with torch.no_grad():
        per_image, n = _clip_score_update(tensors, PROMPTS, metric.model, metric.processor)  # 100 cos, unclamped
        metric.update(tensors, PROMPTS)
        clamped_mean = float(metric.compute())
    mean = float(metric.score / metric.n_samples)  # its accumulated 100 cos before the clamp
    per_image = to_np(per_image).astype(np.float64)
    assert n == len(ims)
    # The clamp is exercised: the random tiny model gives both signs.
    assert (per_image > 0).any() and (per_image < 0).any(), per_image
    errs = {
        "100*cos per image": rel_err(100 * cos, per_image),
        "clip_score per image": rel_err(ours, np.maximum(per_image, 0)),
        # torchmetrics clamps the mean, not each image: compare its aggregate with ours aggregated its way.
        "torchmetrics mean": abs(100 * cos.mean() - mean) / abs(mean),
    }
    assert clamped_mean == max(mean, 0.0)
    summary = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
    print(f"clip_score: torchmetrics mean {mean:.4f}, ours {100 * cos.mean():.4f}; {summary}")
    assert max(errs.values()) <= 1e-5, errs
    assert scorer.provenance["backbone"]["folder"] == CLIP_FOLDER
    json.dumps(scorer.provenance)


def test_pickscore_matches_readme_formula(weights_dir):
    folder = os.path.join(weights_dir, PICKSCORE_FOLDER)
    ims = images(1)
    scorer = PickScorer.from_weights(weights_dir)
    ours = scorer(ims, PROMPTS)

    # PickScore's README, with the processor from the ViT-H-14 folder as there, paired prompts on the diagonal.
    processor = CLIPProcessor.from_pretrained(os.path.join(weights_dir, PICKSCORE_PROCESSOR_FOLDER), backend="pil")
    model = TorchCLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image_inputs = processor(images=ims, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        want = to_np(torch.diagonal(model.logit_scale.exp() * (text_embs @ image_embs.T))).astype(np.float64)
    assert abs(model.logit_scale.exp().item() - np.log(1 / 0.07)) > 0.1  # randomised: a wrong scale shows
    err = rel_err(ours, want)
    print(f"pickscore: per image {err:.2e}")
    assert err <= 1e-5, (ours, want)
    prov = json.loads(json.dumps(scorer.provenance))
    assert prov["preprocessing"]["folder"] == PICKSCORE_PROCESSOR_FOLDER
    assert prov["preprocessing"]["source"] == f"{PICKSCORE_PROCESSOR_FOLDER}/processor_config.json"
    assert prov["tokenizer"]["max_length"] == MAX_POSITIONS
    assert prov["backbone"]["vision"]["image_size"] == IMAGE_SIZE


PREPROCESSING_CASES = {
    "folder": dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
    "odd crop offsets": dict(size={"shortest_edge": 41}, crop_size={"height": 30, "width": 27}),
    "crop larger than resize (zero padding)": dict(size={"shortest_edge": 24}, crop_size={"height": 30, "width": 35}),
    "Hub-style ints": dict(size=45, crop_size=40),
    "exact size, other mean/std": dict(
        size={"height": 36, "width": 28}, do_center_crop=False, image_mean=[0.5, 0.4, 0.3], image_std=0.25
    ),
    "bilinear, no rescale": dict(size={"shortest_edge": 29}, crop_size=29, resample=2, do_rescale=False),
}


@pytest.mark.parametrize("case", PREPROCESSING_CASES)
def test_preprocessing_matches_clip_image_processor(tmp_path, case):
    kw = PREPROCESSING_CASES[case]
    path = str(tmp_path / "preprocessor_config.json")  # what a Hub folder holds
    if case == "Hub-style ints":  # openai/clip-vit-large-patch14's own file: ints, not size dicts
        with open(path, "w") as f:
            json.dump({"feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, **kw}, f)
    else:
        CLIPImageProcessor(**kw).save_pretrained(tmp_path)
    with open(path) as f:
        ours = ImagePreprocessing.from_config(json.load(f), path)
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path)
    assert ref.resample == kw.get("resample", 3)
    ims = images(2)
    rgba = np.concatenate([np.array(ims[0]), np.linspace(0, 255, 50 * 70, dtype=np.uint8).reshape(50, 70, 1)], -1)
    ims += [Image.fromarray(rgba, "RGBA"), ims[2].convert("L"), ims[5].convert("P")]
    want = ref(images=ims, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    got = ours(ims)
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    print(f"preprocessing {case}: max abs {err:.2e}")
    assert err <= 1e-6


def test_preprocessing_defaults_are_clip_image_processor_defaults():
    ours = ImagePreprocessing.from_config({}, "empty")
    ref = CLIPImageProcessorPil()
    assert ours.size == dict(ref.size) == {"shortest_edge": 224} and ours.crop_size == {"height": 224, "width": 224}
    assert (ours.image_mean, ours.image_std) == (tuple(ref.image_mean), tuple(ref.image_std))
    assert ours.resample == ref.resample and ours.rescale_factor == ref.rescale_factor


def _copy(weights_dir, tmp_path, name) -> str:
    dst = tmp_path / "w"
    shutil.copytree(os.path.join(weights_dir, name), dst / name)
    return str(dst)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(InputError, match=rf"{tmp_path}/{CLIP_FOLDER}: no such folder"):
        ClipScorer.from_weights(str(tmp_path))
    with pytest.raises(InputError, match=rf"{tmp_path}/{PICKSCORE_FOLDER}: no such folder"):
        PickScorer.from_weights(str(tmp_path))


def test_missing_processor_config_is_named(weights_dir, tmp_path):
    w = _copy(weights_dir, tmp_path, CLIP_FOLDER)
    os.remove(os.path.join(w, CLIP_FOLDER, "processor_config.json"))
    with pytest.raises(InputError, match=r"expected the image processor settings: preprocessor_config.json"):
        ClipScorer.from_weights(w)
    # PickScore_v1 without a processor and no ViT-H-14 folder: the fallback folder is named.
    pick = _copy(weights_dir, tmp_path / "p", PICKSCORE_FOLDER)
    with pytest.raises(InputError, match=rf"image processor settings \(in {pick}/{PICKSCORE_PROCESSOR_FOLDER}\)"):
        PickScorer.from_weights(pick)


def test_missing_weights_are_named(weights_dir, tmp_path):
    w = _copy(weights_dir, tmp_path, CLIP_FOLDER)
    os.remove(os.path.join(w, CLIP_FOLDER, "model.safetensors"))
    with pytest.raises(InputError, match=rf"{w}/{CLIP_FOLDER}: clip_score .* expected the weights \(model.safetensors"):
        ClipScorer.from_weights(w)
    open(os.path.join(w, CLIP_FOLDER, "pytorch_model.bin"), "wb").close()
    with pytest.raises(InputError, match=r"python -m conversion.torch_files .*pytorch_model.bin"):
        ClipScorer.from_weights(w)


def test_prompts_must_pair_with_images(weights_dir):
    scorer = ClipScorer.from_weights(weights_dir)
    with pytest.raises(InputError, match="2 images and 1 prompts"):
        scorer(images()[:2], ["a cat"])
