"""The digits world's text side: word-level tokenizers built in code and tiny frozen random SD3-shaped encoders.

The tokenizers are `transformers.PreTrainedTokenizerFast` around a `tokenizers` `WordLevel` model, so
`SD3PromptEncoder` calls them exactly as it calls SD3's: CLIP-like ones wrap a prompt in BOS ... EOS, the
T5-like one appends EOS; all pad with `<pad>` to `MAX_LENGTH` tokens. The encoders are our own NNX `CLIPText`
(CLIP-L and CLIP-G shapes) and `T5Encoder` with fixed random weights from a seed (every variable is
re-drawn: no zero biases, no all-ones norms), so the conditioning goes through SD3's real path: CLIP
penultimate states concatenated and zero-padded to the T5 width, then T5 tokens along the sequence; pooled =
CLIP-L projection ++ CLIP-G projection. Widths: CLIP-L 32 + CLIP-G 64 = pooled 96 <= T5 width 128 = the
MMDiT's `joint_attention_dim`; `prompt_embeds` is (B, 2 * MAX_LENGTH, 128).

Every function takes an optional `language` (a world's words and prompts); None is the digits world's, so other
toy worlds (`flowsteer_jax.compose`) share this text side with their own vocabulary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from flowsteer_jax.digits.data import PHRASINGS, WORDS, all_prompts
from flowsteer_jax.models.loading import TextEncoders
from flowsteer_jax.models.text.clip import CLIPText, CLIPTextConfig
from flowsteer_jax.models.text.t5 import T5Config, T5Encoder
from flowsteer_jax.text import SD3PromptEncoder

MAX_LENGTH = 16  # tokenizer.model_max_length and T5 max_sequence_length: the longest prompt is 12 CLIP tokens
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
SPECIAL = (PAD, UNK, BOS, EOS)  # ids 0..3; EOS is not 2, so CLIP pools at the first EOS (not the legacy argmax)

CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
CLIP_G = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
T5 = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
JOINT_ATTENTION_DIM = T5["d_model"]
POOLED_DIM = CLIP_L["projection_dim"] + CLIP_G["projection_dim"]
SEQ_LEN = 2 * MAX_LENGTH  # CLIP tokens then T5 tokens


class Language(NamedTuple):
    """A toy world's text: its words (the vocabulary after the special tokens, in id order) and every prompt it
    has, the empty (unconditional) prompt first; `prompt_table` embeds them all once."""

    words: tuple[str, ...]
    prompts: tuple[str, ...]


@functools.cache
def digits_language() -> Language:
    """Every word the digits prompts use (numerals included), then the digit words; the digits world's prompts."""
    words: list[str] = []
    for phrasing in PHRASINGS:
        for w in phrasing.split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    words += [str(d) for d in range(10)] + list(WORDS)
    return Language(tuple(words), all_prompts())


def vocabulary(language: Language | None = None) -> dict[str, int]:
    """Special tokens, then the language's words (default: the digits world's)."""
    words = (language or digits_language()).words
    return {t: i for i, t in enumerate((*SPECIAL, *words))}


def make_tokenizer(kind: str, language: Language | None = None) -> PreTrainedTokenizerFast:
    """`kind` "clip": BOS $A EOS; "t5": $A EOS. Lower-cased, split on whitespace and punctuation, unknown
    words -> `<unk>`, padded with `<pad>`, `model_max_length` = `MAX_LENGTH`."""
    if kind not in ("clip", "t5"):
        raise ValueError(f"kind must be 'clip' or 't5', got {kind!r}")
    vocab = vocabulary(language)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        post = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, 2), (EOS, 3)]
        )
    else:
        post = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 3)])
    tok.post_processor = post
    special = dict(pad_token=PAD, unk_token=UNK, eos_token=EOS)
    if kind == "clip":
        special["bos_token"] = BOS
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LENGTH, padding_side="right", **special)


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Overwrite every float variable of `model` with a seeded random value (in place; returns `model`).

    Matrices N(0, 1/fan_in) (kernels are (in, out)); embedding tables N(0, 1); norm scales 1 + N(0, 0.2^2);
    other vectors (biases) N(0, 0.2^2). Nothing keeps a zero or all-ones init.
    """
    flat = nnx.to_flat_state(nnx.state(model))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        value = var.get_value()
        if not jnp.issubdtype(value.dtype, jnp.floating):
            continue
        r = jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
        name = ".".join(map(str, path))
        if value.ndim >= 2 and path[-1] == "kernel":
            r = r / np.sqrt(value.shape[0])
        elif value.ndim >= 2:  # token / position / relative-bias tables
            r = r
        elif "norm" in name:
            r = 1 + 0.2 * r
        else:
            r = 0.2 * r
        var.set_value(r.astype(value.dtype))
    return model


def make_encoders(seed: int = 0, language: Language | None = None) -> TextEncoders:
    """CLIP-L-, CLIP-G- and T5-shaped encoders with fixed random weights drawn from `seed`."""
    vocab = len(vocabulary(language))
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    clip_l = CLIPText(
        CLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", **ids, **CLIP_L),
        rngs=nnx.Rngs(seed),
    )
    clip_g = CLIPText(
        CLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_LENGTH, hidden_act="gelu", **ids, **CLIP_G),
        rngs=nnx.Rngs(seed + 1),
    )
    t5 = T5Encoder(T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=3, **T5), rngs=nnx.Rngs(seed + 2))
    base = 1000 * (seed + 1)
    return TextEncoders(randomize(clip_l, base + 1), randomize(clip_g, base + 2), randomize(t5, base + 3))


def make_prompt_encoder(seed: int = 0, language: Language | None = None) -> SD3PromptEncoder:
    """SD3's prompt encoding with the language's tokenizers and random frozen encoders (`seed`)."""
    clip, t5 = make_tokenizer("clip", language), make_tokenizer("t5", language)
    return SD3PromptEncoder(clip, clip, t5, make_encoders(seed, language), JOINT_ATTENTION_DIM)


def encode_with(encoder: SD3PromptEncoder, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds (B, SEQ_LEN, 128), pooled (B, 96)) float32 numpy, as SD3's `encode_prompt` computes them."""
    out = encoder.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
    return np.asarray(out.prompt_embeds, np.float32), np.asarray(out.pooled_prompt_embeds, np.float32)


def prompt_table(seed: int = 0, language: Language | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of every prompt of the language (default: the digits world's), in its prompt order (index 0:
    the empty prompt).

    Read-only arrays (P, SEQ_LEN, 128) and (P, 96) (P = 601 for the digits world); computed once per seed.
    """
    return _prompt_table(seed, language or digits_language())


@functools.cache
def _prompt_table(seed: int, language: Language) -> tuple[np.ndarray, np.ndarray]:
    embeds, pooled = encode_with(_encoder(seed, language), list(language.prompts))
    embeds.setflags(write=False)
    pooled.setflags(write=False)
    return embeds, pooled


@functools.cache
def _prompt_ids(language: Language) -> dict[str, int]:
    return {p: i for i, p in enumerate(language.prompts)}


def encode(
    prompts: str | list[str], *, seed: int = 0, language: Language | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds (B, SEQ_LEN, 128), pooled (B, 96)) float32 numpy; "" is the unconditional prompt.

    Prompts of the language come from the cached `prompt_table(seed, language)`; any other text is encoded on the
    fly.
    """
    language = language or digits_language()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    table_e, table_p = prompt_table(seed, language)
    ids = _prompt_ids(language)
    idx = np.array([ids.get(p, -1) for p in prompts], np.int64)
    embeds, pooled = table_e[np.maximum(idx, 0)], table_p[np.maximum(idx, 0)]
    missing = np.flatnonzero(idx < 0)
    if missing.size:
        e, p = encode_with(_encoder(seed, language), [prompts[i] for i in missing])
        embeds[missing], pooled[missing] = e, p
    return embeds, pooled


@functools.cache
def _encoder(seed: int, language: Language | None = None) -> SD3PromptEncoder:
    return make_prompt_encoder(seed, language)


def encode_with_uncond(
    prompts: str | list[str], *, seed: int = 0, language: Language | None = None
) -> tuple[np.ndarray, ...]:
    """(prompt_embeds, pooled, uncond_embeds, uncond_pooled): the conditioning `evaluate.sample` takes for CFG;
    the unconditional ("") pair has batch 1."""
    return (*encode(prompts, seed=seed, language=language), *encode([""], seed=seed, language=language))
