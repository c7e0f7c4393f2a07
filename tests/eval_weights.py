"""Tiny random stand-ins for the evaluation metrics' upstream weight files, written as upstream writes them: a
transformers CLIP folder with its processor, HPSv2-style open_clip pickles. Shared by the scorer parity tests and
the evaluate command's end-to-end test."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor
from transformers import CLIPModel as TorchCLIPModel

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
