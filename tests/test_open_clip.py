"""open_clip's CLIP layout: parity with `open_clip.CLIP` (HPS-style .pt -> safetensors -> our loader), strict keys."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion import clip_model as clip_model_conv
from conversion import open_clip as open_clip_conv
from conversion.safetensors_io import ConversionError
from conversion.torch_files import convert
from flowsteer_jax.models.clip_model import CLIPModel, load_open_clip_model
from tests.eval_weights import tiny_open_clip
from tests.torch_reference import rel_err, to_np

VOCAB, CTX = 64, 12
TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "mlp_ratio": 3.5},
    "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 40, "heads": 4, "layers": 2},
}


def save_hps_style(model: torch.nn.Module, folder) -> str:
    """As HPSv2 ships its weights: `torch.save({"state_dict": ...})`, then our one-time conversion."""
    pt = str(folder / "model.pt")
    torch.save({"state_dict": model.state_dict()}, pt)
    return convert(pt)


def tokens(seed: int = 1) -> np.ndarray:
    """open_clip-style rows: SOT, words, EOT (the largest id) at different places, then 0 padding."""
    r = np.random.default_rng(seed)
    ids = r.integers(1, VOCAB - 2, (4, CTX))
    ids[:, 0] = VOCAB - 2
    for row, end in enumerate((3, 7, CTX - 1, 5)):
        ids[row, end] = VOCAB - 1
        ids[row, end + 1 :] = 0
    return ids


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_parity(tmp_path, quick_gelu):
    config = {**TINY, "quick_gelu": quick_gelu}
    ref = tiny_open_clip(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_open_clip_model(save_hps_style(ref, tmp_path), str(tmp_path / "config.json"))
    assert isinstance(ours, CLIPModel)
    assert ours.config.vision.hidden_act == ours.config.text.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert ours.config.vision.intermediate_size == 112  # int(32 * 3.5), as open_clip sizes its MLP
    pixels = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = tokens()
    nhwc = pixels.transpose(0, 2, 3, 1)
    with torch.no_grad():
        pt_pixels, pt_ids = torch.from_numpy(pixels), torch.from_numpy(ids)
        want_image = to_np(ref.encode_image(pt_pixels))
        want_text = to_np(ref.encode_text(pt_ids))
        want_logits = to_np(ref.get_logits(pt_pixels, pt_ids)[0])
    got_image = nnx.jit(lambda m, x: m.image_embeds(x))(ours, nhwc)
    got_text = nnx.jit(lambda m, x: m.text_embeds(x))(ours, ids)
    got_logits = nnx.jit(lambda m, x, t: m(x, t))(ours, nhwc, ids)
    assert got_image.shape == (3, 24) and got_text.shape == (4, 24) and got_logits.shape == (3, 4)
    errs = {
        "image_features": rel_err(got_image, want_image),
        "text_features": rel_err(got_text, want_text),
        "logits_per_image": rel_err(got_logits, want_logits),
    }
    print(f"quick_gelu={quick_gelu}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def test_table_covers_the_state_dict_and_the_model_exactly():
    ref = tiny_open_clip({**TINY, "quick_gelu": False})
    table = open_clip_conv.param_table(TINY)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {e.torch_key: e.torch_shape for e in table} == want
    # The same Flax paths and shapes as the transformers-layout table of the same network.
    hf = clip_model_conv.param_table(open_clip_conv.normalize_config(TINY))
    assert {e.flax_path: e.flax_shape for e in table} == {e.flax_path: e.flax_shape for e in hf}


def test_vit_h_14_preset_matches_open_clip():
    """The preset is open_clip's bundled ViT-H-14 config, and normalises to HPSv2's shapes."""
    assert open_clip_conv.VIT_H_14 == {k: v for k, v in open_clip.get_model_config("ViT-H-14").items()}
    c = open_clip_conv.normalize_config(None)
    assert (c["vision"]["num_attention_heads"], c["vision"]["intermediate_size"], c["vision"]["hidden_act"]) == (
        16,
        5120,
        "gelu",
    )
    assert (c["text"]["eos_token_id"], c["text"]["intermediate_size"], c["projection_dim"]) == (49407, 4096, 1024)


def _rewrite(path: str, edit) -> None:
    save_file(edit(load_file(path)), path)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    return save_hps_style(tiny_open_clip({**TINY, "quick_gelu": True}), folder)


def _copy(tiny_file, tmp_path, edit) -> str:
    path = str(tmp_path / "model.safetensors")
    save_file(edit(load_file(tiny_file)), path)
    return path


@pytest.mark.parametrize(
    "key", ["visual.class_embedding", "transformer.resblocks.1.attn.in_proj_weight", "logit_scale"]
)
def test_missing_key_is_named(tiny_file, tmp_path, key):
    path = _copy(tiny_file, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ConversionError, match=f"missing key '{key}'"):
        load_open_clip_model(path, TINY)


def test_extra_and_misshaped_keys_are_named_together(tiny_file, tmp_path):
    extra, bad = "logit_bias", "visual.transformer.resblocks.0.attn.in_proj_bias"
    path = _copy(tiny_file, tmp_path, lambda s: {**s, extra: np.zeros((), np.float32), bad: np.zeros(5, np.float32)})
    with pytest.raises(ConversionError) as e:
        load_open_clip_model(path, TINY)
    assert f"unknown key '{extra}' in {path}" in str(e.value)
    assert f"shape mismatch for '{bad}' in {path}: file has (5,)" in str(e.value)


def test_attn_mask_buffer(tiny_file, tmp_path):
    """An older open_clip's saved causal mask is accepted at its shape (the model builds its own), named otherwise."""
    ref = tiny_open_clip({**TINY, "quick_gelu": True})
    mask = to_np(ref.attn_mask)
    path = _copy(tiny_file, tmp_path, lambda s: {**s, "attn_mask": mask})
    load_open_clip_model(path, TINY)
    path = _copy(tiny_file, tmp_path, lambda s: {**s, "attn_mask": mask[:5, :5]})
    with pytest.raises(ConversionError, match="unknown key 'attn_mask'"):
        load_open_clip_model(path, TINY)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "vision_cfg": {**c["vision_cfg"], "ls_init_value": 0.1}}, r"ls_init_value=0.1 is not supp"),
        (lambda c: {**c, "text_cfg": {**c["text_cfg"], "pool_type": "eos"}}, r"text_cfg: pool_type='eos' is not"),
        (lambda c: {**c, "vision_cfg": {**c["vision_cfg"], "head_width": 12}}, r"width=32 is not divisible by head"),
        (lambda c: {**c, "multimodal_cfg": {}}, r"unknown field 'multimodal_cfg'"),
        (lambda c: {**c, "init_logit_bias": -10}, r"init_logit_bias=-10 is not supported"),
        (lambda c: {k: v for k, v in c.items() if k != "embed_dim"}, r"missing field 'embed_dim'"),
    ],
)
def test_bad_configs_are_named(tmp_path, edit, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(edit(TINY)))
    with pytest.raises(ConversionError, match=message):
        load_open_clip_model(str(tmp_path / "none.safetensors"), str(path))


def test_packed_entries_round_trip(tiny_file):
    """`to_torch_state` concatenates q/k/v back into `in_proj_*`: the loaded model exports to the file, bit for bit."""
    from conversion.table import to_torch_state
    from flowsteer_jax.models.loading import flat_params

    state = to_torch_state(flat_params(load_open_clip_model(tiny_file, TINY)), open_clip_conv.param_table(TINY))
    want = load_file(tiny_file)
    assert set(state) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(state[k].reshape(v.shape), v, err_msg=k)  # logit_scale: () here, (1,) on disk
