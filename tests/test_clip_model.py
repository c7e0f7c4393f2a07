"""CLIP vision tower and full CLIPModel: parity with transformers (loaded from disk), strict key errors, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig
from transformers import CLIPModel as TorchCLIPModel

from conversion import clip_model as clip_model_conv
from conversion.safetensors_io import ConversionError
from flowsteer_jax.models.clip_model import CLIPModel, CLIPVision, load_clip_model
from tests.torch_reference import randomize_, rel_err, to_np

VOCAB = 64
TEXT_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=1,
)
VISION_TINY = dict(
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    num_channels=3,
)
PROJ = 24


def tiny_clip_model(hidden_act: str, seed: int = 0) -> TorchCLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={**TEXT_TINY, "hidden_act": hidden_act},
        vision_config={**VISION_TINY, "hidden_act": hidden_act},
        projection_dim=PROJ,
    )
    model = randomize_(TorchCLIPModel(cfg).eval(), seed)
    assert model.logit_scale.item() != pytest.approx(cfg.logit_scale_init_value)  # nothing keeps its init
    return model


def inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Three NCHW images and four CLIP-like token rows (BOS, words, EOS at different places, then padding)."""
    r = np.random.default_rng(seed)
    pixels = r.standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = r.integers(2, VOCAB - 8, (4, 12))
    ids[:, 0] = VOCAB - 2
    for row, end in enumerate((3, 7, 11, 5)):
        ids[row, end] = VOCAB - 1
        ids[row, end + 1 :] = 1
    return pixels, ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_model_parity_with_transformers(tmp_path, hidden_act):
    ref = tiny_clip_model(hidden_act)
    ref.save_pretrained(tmp_path)
    ours = load_clip_model(str(tmp_path))
    assert isinstance(ours, CLIPModel)
    assert ours.config.vision.hidden_act == ours.config.text.hidden_act == hidden_act
    pixels, ids = inputs()
    nhwc = pixels.transpose(0, 2, 3, 1)
    with torch.no_grad():
        pt_pixels, pt_ids = torch.from_numpy(pixels), torch.from_numpy(ids)
        want_image = to_np(ref.get_image_features(pixel_values=pt_pixels).pooler_output)
        want_text = to_np(ref.get_text_features(input_ids=pt_ids).pooler_output)
        want_logits = to_np(ref(input_ids=pt_ids, pixel_values=pt_pixels).logits_per_image)
    got_image = nnx.jit(lambda m, x: m.image_embeds(x))(ours, nhwc)
    got_text = nnx.jit(lambda m, x: m.text_embeds(x))(ours, ids)
    got_logits = nnx.jit(lambda m, x, t: m(x, t))(ours, nhwc, ids)
    assert got_image.shape == (3, PROJ) and got_text.shape == (4, PROJ) and got_logits.shape == (3, 4)
    errs = {
        "image_embeds": rel_err(got_image, want_image),
        "text_embeds": rel_err(got_text, want_text),
        "logits_per_image": rel_err(got_logits, want_logits),
    }
    # The vision tower alone (`CLIPVisionModelWithProjection`'s layout) with the same weights.
    vision = CLIPVision(ours.config.vision, rngs=nnx.Rngs(1))
    nnx.update(vision.vision_model, nnx.state(ours.vision_model))
    nnx.update(vision.visual_projection, nnx.state(ours.visual_projection))
    errs["CLIPVision"] = rel_err(nnx.jit(lambda m, x: m(x))(vision, nhwc), want_image)
    print(f"{hidden_act}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def test_table_covers_the_state_dict_exactly():
    ref = tiny_clip_model("quick_gelu")
    table = clip_model_conv.param_table(ref.config.to_dict())
    state = ref.state_dict()
    assert {e.torch_key: e.torch_shape for e in table} == {k: tuple(v.shape) for k, v in state.items()}


def _rewrite(folder, edit) -> str:
    path = f"{folder}/model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "key", ["vision_model.embeddings.class_embedding", "logit_scale", "text_model.encoder.layers.1.mlp.fc2.weight"]
)
def test_missing_key_is_named(tmp_path, key):
    tiny_clip_model("gelu").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ConversionError, match=f"missing key '{key}'"):
        load_clip_model(str(tmp_path))


def test_extra_and_misshaped_keys_are_named(tmp_path):
    tiny_clip_model("gelu").save_pretrained(tmp_path)
    extra = "vision_model.embeddings.patch_embedding.bias"
    path = _rewrite(tmp_path, lambda s: {**s, extra: np.zeros((32,), np.float32)})
    with pytest.raises(ConversionError, match=f"unknown key '{extra}' in {path}"):
        load_clip_model(str(tmp_path))
    key = "vision_model.embeddings.position_embedding.weight"
    _rewrite(
        tmp_path, lambda s: {k: (np.zeros((5, 32), np.float32) if k == key else v) for k, v in s.items() if k != extra}
    )
    with pytest.raises(ConversionError, match=rf"shape mismatch for '{key}' in {path}: file has \(5, 32\)"):
        load_clip_model(str(tmp_path))


def test_bad_configs_are_named(tmp_path):
    tiny_clip_model("gelu").save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "hidden_act": "mish"}}))
    with pytest.raises(ConversionError, match=r"config.json vision_config: hidden_act='mish' is not supported"):
        load_clip_model(str(tmp_path))
    cfg_path.write_text(json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "patch_size": 5}}))
    with pytest.raises(ConversionError, match=r"image_size=32 is not divisible by patch_size=5"):
        load_clip_model(str(tmp_path))
    cfg_path.write_text(json.dumps({**cfg, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ConversionError, match=r"config.json: architectures=\['CLIPTextModel'\]"):
        load_clip_model(str(tmp_path))
