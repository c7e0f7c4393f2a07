"""CLIP score and PickScore: one CLIP image-text scorer, two formulas, each with the reference's preprocessing.

- `ClipScorer` (`clip_score`): `100 * max(cos(image, text), 0)` per image, with openai/clip-vit-large-patch14
  (torchmetrics' `CLIPScore` default backbone and formula). torchmetrics itself clamps only the *mean*
  (`max(mean(100 cos), 0)`); the two agree whenever no cosine is negative, which is the case for real CLIP-L on
  real prompts. `ClipScorer.cosine` gives the unclamped values.
- `PickScorer` (`pickscore`): `exp(logit_scale) * cos(image, text)` per image, with yuvalkirstain/PickScore_v1
  (the PickScore README: `model.logit_scale.exp() * text_embs @ image_embs.T`, the diagonal for paired prompts).

Both read a transformers `CLIPModel` folder under one weights directory (`weights_dir/<FOLDER>`), never download.
Images are preprocessed with numpy and PIL exactly as transformers' PIL-backend `CLIPImageProcessor` does
(`CLIPImageProcessorPil` in transformers 5.x, the only image processor in 4.x, so the one the references' numbers were
computed with): convert to RGB (alpha onto white), resize the shortest side with PIL, center crop, rescale, normalise.
transformers 5.x defaults to a torchvision backend whose bicubic resize differs from PIL's by up to ~0.2 in
normalised pixels, so a parity check against transformers must ask for `backend="pil"`.
Prompts go through the folder's own tokenizer (transformers), padded/truncated to the text tower's
`max_position_embeddings`. The forward passes are jitted on a fixed batch size, the last batch padded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from conversion.errors import InputError
from conversion.safetensors_io import read_json, weights_fingerprint
from conversion.torch_files import sha256
from flowsteer_jax.models.clip_model import CLIPModel, load_clip_model

CLIP_FOLDER = "clip-vit-large-patch14"
PICKSCORE_FOLDER = "PickScore_v1"
PICKSCORE_PROCESSOR_FOLDER = "CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's README loads its processor from here

# transformers' names: a 5.x `save_pretrained` nests the image processor in processor_config.json, a Hub folder
# has preprocessor_config.json. transformers reads the nested one first, and so do we.
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))

# CLIPImageProcessor's class defaults (transformers 5.24 models/clip/image_processing_clip.py, image_utils.py).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "default_to_square": False,
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _size_dict(value: Any, default_to_square: bool, what: str) -> dict[str, int]:
    """transformers' `get_size_dict`: an int is a square or a shortest edge, a pair is (height, width)."""
    if isinstance(value, Mapping):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise InputError(f"{what}: cannot read this size: {value!r}")


def _channels(value: Any, what: str) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3:
        raise InputError(f"{what}: needs one value or three (RGB), got {value!r}")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """transformers' `CLIPImageProcessor` (PIL backend) as settings; `__call__` returns (N, H, W, 3) float32."""

    do_convert_rgb: bool
    do_resize: bool
    size: dict[str, int]  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: int
    do_center_crop: bool
    crop_size: dict[str, int]  # {"height": h, "width": w}
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str  # the JSON file the settings came from

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], source: str) -> ImagePreprocessing:
        """Settings from an image processor dict; a missing key takes CLIPImageProcessor's default."""
        c = {k: raw.get(k) if raw.get(k) is not None else v for k, v in PROCESSOR_DEFAULTS.items()}
        size = _size_dict(c["size"], bool(c["default_to_square"]), f"{source} size")
        crop = _size_dict(c["crop_size"], True, f"{source} crop_size")
        if c["do_resize"] and set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise InputError(f"{source}: size={size} is not supported (shortest_edge, or height and width)")
        if c["do_center_crop"] and set(crop) != {"height", "width"}:
            raise InputError(f"{source}: crop_size={crop} needs height and width")
        if int(c["resample"]) not in RESAMPLE_NAMES:
            raise InputError(f"{source}: resample={c['resample']!r} is not a PIL filter ({RESAMPLE_NAMES})")
        return cls(
            do_convert_rgb=bool(c["do_convert_rgb"]),
            do_resize=bool(c["do_resize"]),
            size=size,
            resample=int(c["resample"]),
            do_center_crop=bool(c["do_center_crop"]),
            crop_size=crop,
            do_rescale=bool(c["do_rescale"]),
            rescale_factor=float(c["rescale_factor"]),
            do_normalize=bool(c["do_normalize"]),
            image_mean=_channels(c["image_mean"], f"{source} image_mean"),
            image_std=_channels(c["image_std"], f"{source} image_std"),
            source=source,
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input (no crop, shortest-edge resize)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-serialisable provenance, with a one-line summary."""
        steps = ["convert to RGB (alpha composited onto white)"] if self.do_convert_rgb else []
        if self.do_resize:
            filt = f"PIL {RESAMPLE_NAMES[self.resample]}"
            if "shortest_edge" in self.size:
                steps.append(f"resize shortest side to {self.size['shortest_edge']} ({filt}, long side truncated)")
            else:
                steps.append(f"resize to {self.size['height']}x{self.size['width']} ({filt})")
        if self.do_center_crop:
            steps.append(f"center crop {self.crop_size['height']}x{self.crop_size['width']}")
        if self.do_rescale:
            steps.append(f"rescale by {self.rescale_factor!r}")
        if self.do_normalize:
            steps.append(f"normalize mean={list(self.image_mean)} std={list(self.image_std)}")
        fields = dataclasses.asdict(self)
        fields["image_mean"], fields["image_std"] = list(self.image_mean), list(self.image_std)
        return {"summary": "; ".join(steps), **fields}

    def _to_rgb(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if not self.do_convert_rgb:
            if image.mode != "RGB":
                raise InputError(f"{self.source}: do_convert_rgb is false and an image has mode {image.mode!r}")
            return image
        # transformers' convert_to_rgb: transparency is composited onto white before dropping alpha.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated, not
        # rounded, from a float division; a square keeps both sides at the requested length.
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)

    def _center_crop(self, pixels: np.ndarray) -> np.ndarray:
        """transformers' image_transforms.center_crop on (H, W, C), zero padding included when too small."""
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        h, w = pixels.shape[:2]
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
            return pixels[top : top + ch, left : left + cw]
        nh, nw = max(ch, h), max(cw, w)
        padded = np.zeros((nh, nw) + pixels.shape[2:], pixels.dtype)
        tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded[tp : tp + h, lp : lp + w] = pixels
        top, left = top + tp, left + lp
        return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]

    def one(self, image: PIL.Image.Image) -> np.ndarray:
        """One PIL image -> (H, W, 3) float32, each step in transformers' order and dtypes."""
        image = self._to_rgb(image)
        if self.do_resize:
            h, w = self._resized_size(image.height, image.width)
            image = image.resize((w, h), resample=self.resample, reducing_gap=None)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = self._center_crop(pixels)
        if self.do_rescale:  # transformers upcasts to float64, multiplies, then stores float32
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False) if not np.issubdtype(pixels.dtype, np.floating) else pixels
            mean = np.asarray(self.image_mean, pixels.dtype)
            std = np.asarray(self.image_std, pixels.dtype)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def __call__(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        return np.stack([self.one(im) for im in images])


def image_processor_file(folder: str) -> tuple[str, dict[str, Any]] | None:
    """Where transformers would read `folder`'s image processor settings from, and those settings; None if nowhere."""
    nested = os.path.join(folder, PROCESSOR_CONFIG)
    if os.path.isfile(nested):
        raw = read_json(nested, "processor config")
        if isinstance(raw.get("image_processor"), Mapping):
            return nested, dict(raw["image_processor"])
    flat = os.path.join(folder, PREPROCESSOR_CONFIG)
    if os.path.isfile(flat):
        return flat, read_json(flat, "image processor config")
    return None


def has_tokenizer(folder: str) -> bool:
    return any(all(os.path.isfile(os.path.join(folder, n)) for n in names) for names in TOKENIZER_FILE_SETS)


def _weight_problem(folder: str) -> str | None:
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return None
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
    if pickles:
        return (
            f"safetensors weights (it has only {pickles}: convert once with "
            f"`python -m conversion.torch_files {os.path.join(folder, pickles[0])}`)"
        )
    return "the weights (model.safetensors, or a *.safetensors.index.json with its shards)"


def check_folder(folder: str, what: str, *, processor_folder: str | None = None) -> None:
    """One InputError naming everything missing from a transformers CLIPModel folder (and its processor's)."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder; {what} needs the transformers CLIPModel folder here")
    missing = []
    if not os.path.isfile(os.path.join(folder, "config.json")):
        missing.append("config.json")
    weights = _weight_problem(folder)
    if weights:
        missing.append(weights)
    proc = processor_folder or folder
    where = "" if proc == folder else f" (in {proc})"
    if not os.path.isdir(proc) or image_processor_file(proc) is None:
        missing.append(f"the image processor settings{where}: {PREPROCESSOR_CONFIG} or {PROCESSOR_CONFIG}")
    if not os.path.isdir(proc) or not has_tokenizer(proc):
        missing.append(f"the tokenizer{where}: tokenizer.json, or vocab.json and merges.txt")
    if missing:
        raise InputError(f"{folder}: {what} expected " + "; ".join(missing))


@partial(jax.jit, static_argnums=0)
def _image_forward(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).image_embeds(pixels).astype(jnp.float32)


@partial(jax.jit, static_argnums=0)
def _text_forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).text_embeds(input_ids).astype(jnp.float32)


def _batched(fn, graphdef: nnx.GraphDef, state: nnx.State, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`fn` over `x` in fixed-size batches (the last one padded with copies of row 0), so one compile serves all."""
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
        out.append(np.asarray(fn(graphdef, state, chunk))[:n])
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _CLIPScorerBase:
    """A CLIPModel, its preprocessing and tokenizer; the scorers differ in folder, formula and provenance."""

    key: ClassVar[str]
    FOLDER: ClassVar[str]
    FORMULA: ClassVar[str]
    REFERENCE: ClassVar[str]

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        preprocessing: ImagePreprocessing,
        provenance: dict[str, Any],
        *,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1")
        image_size = model.config.vision.image_size
        if preprocessing.output_size != (image_size, image_size):
            raise InputError(
                f"{preprocessing.source}: preprocessing makes images of {preprocessing.output_size} "
                f"(None: input-dependent), the model takes {image_size}x{image_size}"
            )
        self.model, self.tokenizer, self.preprocessing = model, tokenizer, preprocessing
        self.provenance, self.batch_size = provenance, batch_size
        self.max_length = model.config.text.max_position_embeddings
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def _processor_folder(cls, weights_dir: str, folder: str) -> str:
        return folder

    @classmethod
    def from_weights(cls, weights_dir: str, *, batch_size: int = 32) -> Self:
        """Load `weights_dir/<FOLDER>`: the CLIPModel, its image processor settings and tokenizer."""
        import transformers  # tokenizers only; no torch

        folder = os.path.join(weights_dir, cls.FOLDER)
        proc_folder = cls._processor_folder(weights_dir, folder)
        check_folder(folder, f"{cls.key} ({cls.REFERENCE})", processor_folder=proc_folder)
        model = load_clip_model(folder, jnp.float32)
        proc_path, proc_raw = image_processor_file(proc_folder)
        preprocessing = ImagePreprocessing.from_config(proc_raw, proc_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(proc_folder)
        cfg = model.config
        provenance = {
            "metric": cls.key,
            "formula": cls.FORMULA,
            "reference": cls.REFERENCE,
            "backbone": {
                "folder": cls.FOLDER,
                "architecture": "CLIPModel",
                "projection_dim": cfg.projection_dim,
                "vision": {
                    k: getattr(cfg.vision, k)
                    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
                },
                "text": {
                    k: getattr(cfg.text, k)
                    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                },
            },
            "weights_fingerprint": weights_fingerprint(folder),
            "config_sha256": sha256(os.path.join(folder, "config.json")),
            "preprocessing": {
                **preprocessing.describe(),
                "source": os.path.relpath(proc_path, weights_dir),  # relative: provenance is compared across machines
                "folder": os.path.basename(proc_folder),
                "sha256": sha256(proc_path),
            },
            "image_size": cfg.vision.image_size,
            "tokenizer": {
                "folder": os.path.basename(proc_folder),
                "class": type(tokenizer).__name__,
                "max_length": cfg.text.max_position_embeddings,
                "padding": "max_length",
                "truncation": True,
            },
            "dtype": "float32",
        }
        return cls(model, tokenizer, preprocessing, provenance, batch_size=batch_size)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, max_length) ids; padding to max_length without an attention mask equals the references' padded
        runs, since the text tower is causal and pools at the EOS."""
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        )
        return np.asarray(enc["input_ids"], np.int32)

    def image_embeddings(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """(N, projection_dim) unit-norm float64 image embeddings."""
        return _unit(_batched(_image_forward, self._graphdef, self._state, self.preprocessing(images), self.batch_size))

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, projection_dim) unit-norm float64 text embeddings."""
        return _unit(_batched(_text_forward, self._graphdef, self._state, self.tokenize(prompts), self.batch_size))

    def cosine(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """(N,) float64 cosine similarity of image i with prompts[i]."""
        if isinstance(prompts, str):
            raise InputError("prompts must be a sequence of strings, one per image, not one string")
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images and {len(prompts)} prompts: need one prompt per image")
        if not len(images):
            return np.zeros((0,), np.float64)
        return np.sum(self.image_embeddings(images) * self.text_embeddings(prompts), axis=-1)

    def _score(self, cos: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """(N,) float64 score of image i against prompts[i]."""
        return self._score(self.cosine(images, prompts))


class ClipScorer(_CLIPScorerBase):
    """CLIP score with openai/clip-vit-large-patch14: `100 * max(cos, 0)` per image."""

    key = "clip_score"
    FOLDER = CLIP_FOLDER
    FORMULA = "100 * max(cos(image_embeds, text_embeds), 0) per image"
    REFERENCE = "torchmetrics.multimodal.CLIPScore (openai/clip-vit-large-patch14)"

    def _score(self, cos: np.ndarray) -> np.ndarray:
        return 100.0 * np.maximum(cos, 0.0)


class PickScorer(_CLIPScorerBase):
    """PickScore v1: `exp(logit_scale) * cos` per image, processor/tokenizer from the folder or the ViT-H-14 one."""

    key = "pickscore"
    FOLDER = PICKSCORE_FOLDER
    FORMULA = "exp(logit_scale) * cos(image_embeds, text_embeds) per image"
    REFERENCE = "PickScore README (yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"

    @classmethod
    def _processor_folder(cls, weights_dir: str, folder: str) -> str:
        # The Hub's PickScore_v1 may lack a processor; its README loads the one of the ViT-H-14 it was tuned from.
        if os.path.isdir(folder) and image_processor_file(folder) is not None and has_tokenizer(folder):
            return folder
        return os.path.join(weights_dir, PICKSCORE_PROCESSOR_FOLDER)

    def _score(self, cos: np.ndarray) -> np.ndarray:
        scale = float(np.exp(np.float64(np.asarray(self.model.logit_scale[...]))))
        return scale * cos
