"""Tiny random stand-ins for the evaluation metrics' upstream weight files, written as upstream writes them: a
transformers CLIP folder with its processor, HPSv2-style open_clip pickles, pytorch-fid's Inception `.pth` (full
size: its architecture is fixed) with random weights. Shared by the scorer parity tests and
the evaluate command's end-to-end test."""

from __future__ import annotations

import os

import numpy as np
import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor
from transformers import CLIPModel as TorchCLIPModel

from flowsteer_jax.evaluation.fid import WEIGHT_NAME as INCEPTION_WEIGHTS
from flowsteer_jax.tools.tiny_pipeline import clip_tokenizer
from tests.torch_reference import randomize_

IMAGE_SIZE = 32
MAX_POSITIONS = 24  # not the tokenizer's 77: a scorer must pad to the model's length


def tiny_clip(seed: int) -> TorchCLIPModel:
    """A transformers CLIPModel of the in-code tokenizer's vocabulary, every tensor random."""
    tok = clip_tokenizer()
    torch.manual_seed(seed)
    common = dict(num_hidden_layers=2, hidden_act="quick_gelu")
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=1,
            **common,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=40, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, **common
        ),
        projection_dim=24,
    )
    return randomize_(TorchCLIPModel(cfg).eval(), seed)


def save_processor(folder, **image_kw) -> None:
    kw = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **image_kw)
    CLIPProcessor(image_processor=CLIPImageProcessor(**kw), tokenizer=clip_tokenizer()).save_pretrained(folder)


def tiny_open_clip(config: dict, seed: int = 0) -> open_clip.CLIP:
    """An open_clip CLIP of `config` (open_clip's model-config format), every weight random."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config).eval()
    init_scale, causal_mask = model.logit_scale.item(), model.attn_mask.clone()
    randomize_(model, seed)
    model.attn_mask.copy_(causal_mask)  # a buffer open_clip derives, not a weight: randomize_ overwrites it too
    assert model.logit_scale.item() != pytest.approx(init_scale)  # nothing keeps its init
    return model


def save_hps(folder, name: str, config: dict, seed: int) -> open_clip.CLIP:
    """As HPSv2 ships its weights: `torch.save({"state_dict": ...})` under `name`."""
    model = tiny_open_clip(config, seed)
    torch.save({"state_dict": model.state_dict()}, os.path.join(folder, name))
    return model


def random_fid_inception(seed: int = 0) -> torch.nn.Module:
    """pytorch-fid's `fid_inception_v3()` architecture with every tensor random (nothing downloaded).

    BatchNorm gets positive running variances and scales near 1, and the convs He-scaled weights, so the
    activations stay O(1) through the depth instead of vanishing: a wrong mapping deep in the net stays visible.
    """
    import pytorch_fid.inception as pfi
    import torchvision.models.inception as tvi

    with pytest.MonkeyPatch.context() as mp:  # build the architecture only: its weight loading is a no-op here
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tvi.Inception3, "load_state_dict", lambda self, *a, **k: None)
        model = pfi.fid_inception_v3().eval()
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
                module.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
            elif isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(np.sqrt(2.0))
    return model


def write_inception(folder: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """`folder/pt_inception-2015-12-05-6726825d.pth`, random; returns the state dict written."""
    state = random_fid_inception(seed).state_dict()
    assert "fc.weight" in state and "Mixed_7c.branch_pool.bn.num_batches_tracked" in state  # skipped, not absent
    torch.save(state, os.path.join(folder, INCEPTION_WEIGHTS))
    return state


def patch_download(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytorch-fid's weight download reads `folder`'s .pth instead (its `load_state_dict` stays strict)."""
    import pytorch_fid.inception as pfi

    path = os.path.join(folder, INCEPTION_WEIGHTS)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(path, weights_only=True))
