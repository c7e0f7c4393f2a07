"""HPSv2 (Wu et al. 2023): the cosine of open_clip ViT-H-14 image and text features, fine-tuned on human preferences.

Mirrors HPSv2's `img_score.py` (github.com/tgxs002/HPSv2): `image_transform(224, is_train=False,
resize_longest_max=True)` of its open_clip fork, `get_tokenizer('ViT-H-14')`, then
`diag(image_features @ text_features.T)` of the normalised features, with no logit scale. The weights are the upstream
`HPS_v2.1_compressed.pt` / `HPS_v2_compressed.pt` (a `{"state_dict": ...}` pickle), converted once to safetensors by
`conversion.torch_files`; the network is `flowsteer_jax.models.clip_model.CLIPModel` through the open_clip key table.

Preprocessing, as HPSv2's fork composes it (not as open_clip 3.x's `ResizeKeepRatio` would):
`convert("RGB")`, `ToTensor()`, `ResizeMaxSize` on the float tensor (bicubic to longest side = image size, then
zero-pad to a square, left/top = (size - new) // 2), `Normalize(OpenAI mean, std)`. torchvision >= 0.17 resizes a
tensor with antialiasing, which is PIL's bicubic filter evaluated in float; PIL's float ("F") mode does the same
per channel here, without torch. Two upstream quirks are not copied, since upstream crashes on them: an RGBA image
stays 4-channel there (we drop alpha), and a non-square image whose longest side already equals the size is neither
resized nor padded there (we pad it).
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from safetensors import safe_open

from conversion.errors import InputError
from conversion.torch_files import convert, safetensors_path, sha256
from flowsteer_jax.models.clip_model import CLIPModel, load_open_clip_model

WEIGHT_NAMES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")  # preference order: v2.1 first
OPENAI_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
OPENAI_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
PREPROCESSING = (
    "HPSv2 eval transform: convert RGB, ToTensor, bicubic resize (antialiased, float) so the longest side equals "
    "the image size, zero-pad to a square (left/top = (size - new) // 2), Normalize(OpenAI mean/std)"
)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One PIL image -> (size, size, 3) float32, normalised, as HPSv2's eval transform (module docstring)."""
    rgb = np.asarray(image.convert("RGB"), np.float32) / np.float32(255)  # ToTensor: float32 division by 255
    h, w = rgb.shape[:2]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)  # Python's round, as ResizeMaxSize
    if scale != 1.0:
        rgb = np.stack(
            [
                np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c])).resize((new_w, new_h), Image.BICUBIC))
                for c in range(3)
            ],
            axis=-1,
        )
    out = np.zeros((size, size, 3), np.float32)  # the pad value 0 is in [0, 1] space, before Normalize
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = rgb
    return (out - OPENAI_MEAN) / OPENAI_STD


def clean(text: str) -> str:
    """open_clip's `basic_clean` + `whitespace_clean`: ftfy, HTML entities unescaped twice, runs of
    whitespace collapsed. transformers' CLIPTokenizer does only the whitespace and lower-casing part, so without
    this `&amp;`, fullwidth letters or mojibake would tokenise differently from HPSv2."""
    text = ftfy.fix_text(text)
    return " ".join(html.unescape(html.unescape(text)).split())


def tokenize(tokenizer: Any, prompts: Sequence[str], context_length: int) -> np.ndarray:
    """open_clip's `tokenize` with a transformers CLIPTokenizer: cleaned text (`clean`), SOT, BPE tokens, EOT;
    over-long prompts cut to `context_length` with EOT kept last; padded with 0 (whatever the tokenizer's pad)."""
    rows = tokenizer([clean(p) for p in prompts], truncation=True, max_length=context_length)["input_ids"]
    ids = np.zeros((len(rows), context_length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


def find_weights(weights_dir: str) -> str:
    """The HPSv2 safetensors file in `weights_dir` (v2.1 preferred), converting an upstream `.pt` on first use."""
    expected = [n for name in WEIGHT_NAMES for n in (name, os.path.basename(safetensors_path(name)))]
    if not os.path.isdir(weights_dir):
        raise InputError(f"{weights_dir}: not a directory (HPSv2 weights expected there: one of {expected})")
    for name in WEIGHT_NAMES:
        converted = os.path.join(weights_dir, os.path.basename(safetensors_path(name)))
        if os.path.isfile(converted):
            return converted
        if os.path.isfile(os.path.join(weights_dir, name)):
            return convert(os.path.join(weights_dir, name))
    raise InputError(f"{weights_dir}: no HPSv2 weights; expected one of {expected}")


def _cosine(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array, ids: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    img = model.image_embeds(pixels).astype(jnp.float32)
    txt = model.text_embeds(ids).astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.sum(img * txt, axis=-1)  # the diagonal of img @ txt.T


class HPSScorer:
    """`scorer(images, prompts) -> (N,) float64`: HPSv2 of image i against prompts[i]."""

    key = "hps"

    def __init__(self, model: CLIPModel, tokenizer: Any, provenance: Mapping[str, Any], *, batch_size: int = 32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"HPS batch_size={batch_size!r}: must be a positive int")
        text = model.config.text
        if tokenizer.eos_token_id != text.eos_token_id or tokenizer.bos_token_id != text.bos_token_id:
            raise InputError(
                f"HPS tokenizer: BOS/EOS ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, the model's are "
                f"{text.bos_token_id}/{text.eos_token_id} (expected the CLIP BPE tokenizer of the model's vocabulary)"
            )
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.image_size, self.context_length = model.config.vision.image_size, text.max_position_embeddings
        self.provenance = dict(provenance)
        graphdef, self._state = nnx.split(model)
        # One fixed batch shape (the last batch is padded), so it compiles once.
        self._score = jax.jit(functools.partial(_cosine, graphdef))

    @classmethod
    def from_weights(
        cls,
        weights_dir: str,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        config: str | Mapping[str, Any] | None = None,
        dtype: jnp.dtype = jnp.float32,
    ) -> HPSScorer:
        """`weights_dir` holds `WEIGHT_NAMES` (or their `.safetensors` conversions); `config`: an open_clip model
        config (path or dict) instead of ViT-H-14, for tests; by default a JSON of the weights' stem beside them
        (`HPS_v2.1_compressed.json`) if there is one, else ViT-H-14. `tokenizer`: a transformers CLIPTokenizer (the
        OpenAI BPE: SD3's CLIP-L tokenizer folder serves)."""
        path = find_weights(weights_dir)
        beside = os.path.splitext(path)[0] + ".json"
        if config is None and os.path.isfile(beside):
            config = beside
        model = load_open_clip_model(path, config, dtype)
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
        name = os.path.basename(path)
        provenance = {
            "metric": "HPSv2",
            "version": "v2.1" if "v2.1" in name else "v2.0",
            "weights": name,
            "weights_sha256": sha256(path),
            "source": meta.get("source"),
            "source_sha256": meta.get("source_sha256"),
            "backbone": "open_clip ViT-H-14"
            if config is None
            else f"open_clip ({os.path.basename(config) if isinstance(config, str) else 'custom config'})",
            "preprocessing": PREPROCESSING,
            "image_size": model.config.vision.image_size,
            "tokenizer": f"CLIP BPE, context {model.config.text.max_position_embeddings}, EOT kept last, 0-padded",
            "text_cleaning": "ftfy + html.unescape x2 + whitespace",
            "score": "cosine of the normalised image and text features (no logit scale)",
            "dtype": jnp.dtype(dtype).name,
        }
        return cls(model, tokenizer, provenance, batch_size=batch_size)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"HPS: {len(images)} images but {len(prompts)} prompts")
        scores = []
        b, s = self.batch_size, self.image_size
        for start in range(0, len(images), b):
            chunk = range(start, min(start + b, len(images)))
            pixels = np.zeros((b, s, s, 3), np.float32)
            ids = np.zeros((b, self.context_length), np.int32)
            for row, i in enumerate(chunk):
                pixels[row] = preprocess(images[i], s)
            ids[: len(chunk)] = tokenize(self.tokenizer, [prompts[i] for i in chunk], self.context_length)
            scores.append(np.asarray(self._score(self._state, pixels, ids))[: len(chunk)])
        return np.concatenate(scores).astype(np.float64) if scores else np.zeros((0,), np.float64)
