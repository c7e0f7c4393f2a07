"""`SD3PromptEncoder.encode_prompt` against diffusers' `StableDiffusion3Pipeline.encode_prompt`, on tiny saved
pipelines whose tokenizers are built in code (flowsteer_jax/tools/tiny_pipeline.py)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import StableDiffusion3Pipeline

from conversion.safetensors_io import ConversionError
from flowsteer_jax.models.loading import load_text_encoders
from flowsteer_jax.text import SD3PromptEncoder
from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline
from tests.torch_reference import rel_err, to_np

LONG = "a photo of a red cube on a blue sphere and a cat " * 6  # > 77 CLIP tokens, > 24 T5 tokens
CASES = [
    dict(prompt=["a photo of a cat", LONG]),
    dict(prompt="the dog", prompt_2="a blue cube", prompt_3="A red Sphere!", negative_prompt="blue", clip_skip=1),
    dict(
        prompt=["a cat", "the red digit 7"],
        negative_prompt=["a dog", "x"],
        negative_prompt_2=["cube", "sphere"],
        num_images_per_prompt=2,
    ),
    dict(prompt=["", "Photo of an unknown word: zebra"], do_classifier_free_guidance=False),
]
MAX_SEQ = 24


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    out = {}
    for with_t5 in (True, False):
        folder = str(tmp_path_factory.mktemp(f"sd3_t5_{with_t5}"))
        write_tiny_pipeline(folder, with_t5=with_t5)
        # diffusers loads a folder saved without T5 only when told again that T5 is absent
        kw = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
        ref = StableDiffusion3Pipeline.from_pretrained(folder, **kw)
        out[with_t5] = (folder, ref, SD3PromptEncoder.from_pretrained(folder))
    return out


def _compare(ref, ours, case) -> float:
    kw = {k: v for k, v in case.items() if k not in ("prompt", "prompt_2", "prompt_3")}
    want = ref.encode_prompt(
        case["prompt"], case.get("prompt_2"), case.get("prompt_3"), max_sequence_length=MAX_SEQ, **kw
    )
    got = ours.encode_prompt(
        case["prompt"], case.get("prompt_2"), case.get("prompt_3"), max_sequence_length=MAX_SEQ, **kw
    )
    errs = []
    for name, a, b in zip(got._fields, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == tuple(b.shape) and a.dtype == jnp.float32, name
        errs.append(rel_err(a, to_np(b)))
    return max(errs)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_encode_prompt_matches_diffusers(pipelines, case):
    _, ref, ours = pipelines[True]
    err = _compare(ref, ours, CASES[case])
    print(f"max relative error {err:.2e}")
    assert err <= 1e-5


def test_shapes_follow_sd3_layout(pipelines):
    _, _, ours = pipelines[True]
    out = ours.encode_prompt(["a cat", "a dog"], num_images_per_prompt=3, max_sequence_length=MAX_SEQ)
    assert out.prompt_embeds.shape == (6, 77 + MAX_SEQ, 96)  # CLIP tokens then T5 tokens, at the T5 width
    assert out.pooled_prompt_embeds.shape == (6, 32 + 48)  # CLIP-L then CLIP-G projections
    assert out.negative_prompt_embeds.shape == out.prompt_embeds.shape
    clip = np.asarray(out.prompt_embeds[:, :77])
    assert np.all(clip[..., 32 + 48 :] == 0)  # CLIP channels zero-padded to the T5 width
    np.testing.assert_array_equal(out.prompt_embeds[0], out.prompt_embeds[2])  # repeats of one prompt, in order


@pytest.mark.parametrize("case", [0, 1])
def test_encode_prompt_without_t5_matches_diffusers(pipelines, case):
    """A pipeline saved with `text_encoder_3=None`: T5 tokens are zeros of the transformer's joint width."""
    folder, ref, ours = pipelines[False]
    assert ref.text_encoder_3 is None and ours.encoders.t5 is None
    assert json.load(open(f"{folder}/model_index.json"))["text_encoder_3"] == [None, None]
    err = _compare(ref, ours, CASES[case])
    print(f"max relative error {err:.2e}")
    assert err <= 1e-5
    out = ours.encode_prompt("a cat", max_sequence_length=MAX_SEQ)
    assert out.prompt_embeds.shape == (1, 77 + MAX_SEQ, 96) and np.all(np.asarray(out.prompt_embeds[:, 77:]) == 0)


def test_skipping_t5_equals_diffusers_with_text_encoder_3_none(pipelines):
    folder, _, _ = pipelines[True]
    ref = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    ours = SD3PromptEncoder.from_pretrained(folder, t5=False)
    assert ours.encoders.t5 is None and ours.tokenizers[2] is None
    assert _compare(ref, ours, CASES[1]) <= 1e-5


def test_bf16_encoders_give_bf16_embeddings(pipelines):
    folder, _, ours32 = pipelines[True]
    ours = SD3PromptEncoder.from_pretrained(folder, jnp.bfloat16)
    out = ours.encode_prompt("a photo of a cat", max_sequence_length=MAX_SEQ)
    ref = ours32.encode_prompt("a photo of a cat", max_sequence_length=MAX_SEQ)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == jnp.bfloat16
        assert rel_err(np.asarray(a, np.float32), b) < 5e-2


def test_missing_component_folder_is_named(tmp_path, pipelines):
    folder, _, _ = pipelines[True]
    import shutil

    shutil.copytree(folder, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "text_encoder_2")
    with pytest.raises(ConversionError, match=r"no text_encoder_2/ folder \(.*model_index.json lists it\)"):
        load_text_encoders(str(tmp_path / "p"))
