"""SD3 prompt encoding: diffusers' `StableDiffusion3Pipeline.encode_prompt`, with the encoders in JAX.

Tokenizers are transformers' own, loaded from the pipeline's `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` with
the classes `model_index.json` names, and called with diffusers' exact padding/truncation arguments, so the
token ids are the same. Per prompt:

- CLIP-L and CLIP-G: ids padded/truncated to `tokenizer.model_max_length` (77); the penultimate hidden state
  (or `hidden_states[-(clip_skip + 2)]`) of each, concatenated on channels and zero-padded to the T5 width;
  pooled = concat(CLIP-L `text_embeds`, CLIP-G `text_embeds`), both projected.
- T5: ids padded/truncated to `max_sequence_length`; its last hidden state. Without a T5 encoder, zeros of shape
  (max_sequence_length, joint_attention_dim).
- prompt_embeds = concat(CLIP tokens, T5 tokens) along the sequence: (B, 77 + max_sequence_length, D_t5).
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh

from conversion.errors import shorten
from flowsteer_jax.models.loading import TextEncoders, load_text_encoders, pipeline_component

log = logging.getLogger(__name__)

Prompt = str | list[str]


class PromptEmbeds(NamedTuple):
    prompt_embeds: jax.Array  # (B * num_images_per_prompt, 77 + max_sequence_length, joint_attention_dim)
    negative_prompt_embeds: jax.Array | None  # same shape; None without classifier-free guidance
    pooled_prompt_embeds: jax.Array  # (B * num_images_per_prompt, CLIP-L proj + CLIP-G proj)
    negative_pooled_prompt_embeds: jax.Array | None


@partial(jax.jit, static_argnums=(0, 3))
def _clip_forward(graphdef, state, input_ids, hidden_index: int) -> tuple[jax.Array, jax.Array]:
    out = nnx.merge(graphdef, state)(input_ids)
    return out.hidden_states[hidden_index], out.text_embeds


@partial(jax.jit, static_argnums=(0,))
def _t5_forward(graphdef, state, input_ids) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids).last_hidden_state


def _load_tokenizer(folder: str, name: str, default: str):
    """The tokenizer class `model_index.json` names (as diffusers picks it), loaded from `folder/name`."""
    cls_name = default
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            entry = json.load(f).get(name)
        if isinstance(entry, list) and entry[-1]:
            cls_name = entry[-1]
    return getattr(transformers, cls_name).from_pretrained(os.path.join(folder, name))


def _as_list(prompt: Prompt) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


class SD3PromptEncoder:
    """The three tokenizers and text encoders of an SD3 pipeline; `encode_prompt` as diffusers computes it."""

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3, encoders: TextEncoders, joint_attention_dim: int):
        if (tokenizer_3 is None) != (encoders.t5 is None):
            raise ValueError("the T5 tokenizer and the T5 encoder must be given together (or both be None)")
        self.tokenizers = (tokenizer, tokenizer_2, tokenizer_3)
        self.encoders = encoders
        self.joint_attention_dim = joint_attention_dim
        self.tokenizer_max_length = tokenizer.model_max_length
        self._split = [None if m is None else nnx.split(m) for m in encoders]
        self._truncated: set[str] = set()  # the encoders whose truncation was reported

    @classmethod
    def from_pretrained(
        cls,
        folder: str,
        dtype: jnp.dtype = jnp.float32,
        *,
        t5: bool = True,
        mesh: Mesh | None = None,
        implementation: str | None = None,
    ) -> SD3PromptEncoder:
        """Load from a diffusers SD3 folder. `t5=False` (or a folder saved without T5) gives T5 zeros."""
        encoders = load_text_encoders(folder, dtype, t5=t5, mesh=mesh, implementation=implementation)
        has_t5 = encoders.t5 is not None and pipeline_component(folder, "tokenizer_3") is not None
        tokenizer_3 = _load_tokenizer(folder, "tokenizer_3", "T5TokenizerFast") if has_t5 else None
        joint = 4096  # SD3Transformer2DModel's default, when the folder has no transformer to say otherwise
        transformer_config = os.path.join(folder, "transformer", "config.json")
        if os.path.isfile(transformer_config):
            with open(transformer_config) as f:
                joint = json.load(f).get("joint_attention_dim", joint)
        return cls(
            _load_tokenizer(folder, "tokenizer", "CLIPTokenizer"),
            _load_tokenizer(folder, "tokenizer_2", "CLIPTokenizer"),
            tokenizer_3,
            encoders if has_t5 else encoders._replace(t5=None),
            joint,
        )

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int, what: str) -> np.ndarray:
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
        ).input_ids
        longest = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
        if longest.shape[-1] >= ids.shape[-1] and not np.array_equal(ids, longest) and what not in self._truncated:
            # Once per encoder, cut: a training run encodes the same long prompts every epoch, and a 100k-character
            # prompt would print its whole tail at each call.
            self._truncated.add(what)
            removed = shorten(tokenizer.batch_decode(longest[:, max_length - 1 : -1]))
            log.warning("%s: prompts over %d tokens are truncated (said once); cut: %s", what, max_length, removed)
        return ids

    def _clip(self, i: int, prompts: list[str], clip_skip: int | None) -> tuple[jax.Array, jax.Array]:
        ids = self._tokenize(self.tokenizers[i], prompts, self.tokenizer_max_length, f"CLIP ({i + 1})")
        graphdef, state = self._split[i]
        hidden, pooled = _clip_forward(graphdef, state, ids, -2 if clip_skip is None else -(clip_skip + 2))
        return hidden.astype(self.encoders.clip_l.dtype), pooled

    def _t5(self, prompts: list[str], max_sequence_length: int) -> jax.Array:
        if self.encoders.t5 is None:
            shape = (len(prompts), max_sequence_length, self.joint_attention_dim)
            return jnp.zeros(shape, self.encoders.clip_l.dtype)
        ids = self._tokenize(self.tokenizers[2], prompts, max_sequence_length, "T5")
        return _t5_forward(*self._split[2], ids).astype(self.encoders.t5.dtype)

    def _embed(
        self, p1: list[str], p2: list[str], p3: list[str], clip_skip: int | None, max_sequence_length: int
    ) -> tuple[jax.Array, jax.Array]:
        l_hidden, l_pooled = self._clip(0, p1, clip_skip)
        g_hidden, g_pooled = self._clip(1, p2, clip_skip)
        t5 = self._t5(p3, max_sequence_length)
        clip = jnp.concatenate([l_hidden, g_hidden], axis=-1)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return jnp.concatenate([clip, t5], axis=-2), jnp.concatenate([l_pooled, g_pooled], axis=-1)

    def encode_prompt(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        prompt_3: Prompt | None = None,
        *,
        negative_prompt: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
        negative_prompt_3: Prompt | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
    ) -> PromptEmbeds:
        """diffusers' `encode_prompt` (same arguments, same defaults, same outputs), as JAX arrays.

        `prompt_2`/`prompt_3` go to CLIP-G/T5 (default: `prompt`); negatives default to "" for all three, and,
        as in diffusers, are encoded without `clip_skip`.
        """
        prompt = _as_list(prompt)
        batch = len(prompt)
        p2 = _as_list(prompt_2 or prompt)
        p3 = _as_list(prompt_3 or prompt)
        embeds, pooled = self._embed(prompt, p2, p3, clip_skip, max_sequence_length)
        neg_embeds = neg_pooled = None
        if do_classifier_free_guidance:
            negative_prompt = negative_prompt or ""
            negs = [negative_prompt, negative_prompt_2 or negative_prompt, negative_prompt_3 or negative_prompt]
            negs = [batch * [n] if isinstance(n, str) else list(n) for n in negs]
            if len(negs[0]) != batch:
                raise ValueError(f"negative_prompt has batch size {len(negs[0])}, prompt has {batch}")
            neg_embeds, neg_pooled = self._embed(*negs, None, max_sequence_length)
        repeat = partial(jnp.repeat, repeats=num_images_per_prompt, axis=0)
        return PromptEmbeds(
            repeat(embeds),
            None if neg_embeds is None else repeat(neg_embeds),
            repeat(pooled),
            None if neg_pooled is None else repeat(neg_pooled),
        )
