"""A tiny random SD3 pipeline folder, tokenizers included, written by diffusers' own `save_pretrained`.

Nothing is downloaded: the CLIP BPE vocabulary/merges and the T5 unigram `tokenizer.json` are built here, and
every weight of every model is re-randomised (`randomize_`), so a wrong mapping cannot hide behind an init.
Shapes keep SD3's relations: CLIP-L and CLIP-G widths sum to the pooled width and fit inside the T5 width, which
is the transformer's `joint_attention_dim`; the VAE has 16 latent channels, SD3's scale/shift and no quant convs.

Used by the tests, the benchmarks and `python -m flowsteer_jax.tools.tiny_model`. Needs torch, transformers,
diffusers and tokenizers when called (imported inside the functions): importing this module needs none of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flowsteer_jax.tools.randomize import randomize_

if TYPE_CHECKING:  # torch, transformers, diffusers and tokenizers are imported where they are used
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

CLIP_MAX_LENGTH = 77
WORDS = ("a", "an", "the", "of", "on", "in", "and", "photo", "cat", "dog", "red", "blue", "cube", "sphere", "digit")
# CLIP-L pools at argmax(input_ids) (SD3's legacy eos_token_id=2 config); CLIP-G at its real EOS id.
CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
CLIP_G = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, projection_dim=48)
T5 = dict(
    d_model=96,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout in miniature: 256 byte characters, the same with `</w>`, merge results, then BOS and EOS last
    (so EOS has the largest id, which the legacy argmax pooling relies on)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        if len(word) < 2:
            continue
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = (piece, nxt)
            piece = piece + nxt
            if merge not in merges:
                merges.append(merge)
                tokens.append(piece)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer_json(path: str) -> None:
    """A T5-style unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, `▁` word starts, `</s>` appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces += [(c, -6.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(path)


def t5_tokenizer(workdir: str) -> T5TokenizerFast:
    from transformers import T5TokenizerFast

    path = os.path.join(workdir, "t5_tokenizer.json")
    t5_tokenizer_json(path)
    return T5TokenizerFast(tokenizer_file=path, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def write_tiny_pipeline(folder: str, *, with_t5: bool = True, seed: int = 0) -> None:
    """Write a diffusers `StableDiffusion3Pipeline` folder with tiny random models and in-code tokenizers.

    `with_t5=False` saves it as diffusers does with `text_encoder_3=None, tokenizer_3=None` (model_index.json
    entries `[null, null]`); the transformer keeps the T5 width as its `joint_attention_dim`.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    os.makedirs(folder, exist_ok=True)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")  # SD3's CLIP-G pads with "!"
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id

    def clip(over: dict, eos_token_id: int, act: str, k: int) -> CLIPTextModelWithProjection:
        cfg = CLIPTextConfig(
            vocab_size=vocab,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=1,
            **over,
        )
        return randomize_(CLIPTextModelWithProjection(cfg).eval(), seed + k)

    torch.manual_seed(seed)
    text_encoder = clip(CLIP_L, 2, "quick_gelu", 1)
    text_encoder_2 = clip(CLIP_G, eos, "gelu", 2)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = t5_tokenizer(folder)
        os.remove(os.path.join(folder, "t5_tokenizer.json"))
        text_encoder_3 = randomize_(T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **T5)).eval(), seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5["d_model"],
        caption_projection_dim=32,
        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
        out_channels=16,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=randomize_(transformer.eval(), seed + 4),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=randomize_(vae.eval(), seed + 5),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
