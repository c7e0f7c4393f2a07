"""The metrics of `flowsteer_jax.evaluate` and of training's `eval.metrics`: which exist, which a weights folder
allows, the loaded scorers, and a row's numbers on the paper's scales (see `flowsteer_jax.evaluate`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from conversion.errors import InputError

# flag name -> the JSON key of the metric and its column header
METRICS = {
    "pickscore": ("pickscore", "PickScore"),
    "hps": ("hps", "HPSv2"),
    "clip": ("clip_score", "CLIP"),
    "fid": ("fid", "FID"),
    "kid": ("kid", "KID x10^3"),
}
TEXT_METRICS = ("pickscore", "hps", "clip")
# Folders whose tokenizer is OpenAI's CLIP BPE (open_clip's too), in the order HPSv2 looks for one.
HPS_TOKENIZER_FOLDERS = ("clip-vit-large-patch14", "CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore_v1")
CHUNK = 64  # images held in memory at a time while scoring


# --- which metrics the weights allow, and the scorers ---


def _hps_tokenizer(weights: str):
    from transformers import CLIPTokenizer

    for name in HPS_TOKENIZER_FOLDERS:
        folder = os.path.join(weights, name)
        files = ("tokenizer.json",), ("vocab.json", "merges.txt")
        if any(all(os.path.isfile(os.path.join(folder, f)) for f in group) for group in files):
            return CLIPTokenizer.from_pretrained(folder), name
    raise InputError(
        f"{weights}: HPSv2 needs OpenAI's CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt) in one of "
        f"{', '.join(HPS_TOKENIZER_FOLDERS)}/ (the CLIP-L folder has it)"
    )


def available_metrics(weights: str | None, ref: str | None) -> list[str]:
    """The metrics whose files are in `weights` (FID/KID also need `ref`), in `METRICS` order."""
    if not weights:
        return []
    from flowsteer_jax.evaluation import clip_scores, fid, hps

    def has(*names: str) -> bool:
        return any(os.path.exists(os.path.join(weights, n)) for n in names)

    def with_conversions(names: Sequence[str]) -> list[str]:
        return [*names, *(os.path.splitext(n)[0] + ".safetensors" for n in names)]

    found = {
        "pickscore": has(clip_scores.PICKSCORE_FOLDER),
        "hps": has(*with_conversions(hps.WEIGHT_NAMES)),
        "clip": has(clip_scores.CLIP_FOLDER),
        "fid": ref is not None and has(*with_conversions([fid.WEIGHT_NAME])),
    }
    found["kid"] = found["fid"]
    return [m for m in METRICS if found[m]]


class Scorers:
    """The loaded scorers for a set of metrics: `score(images, prompts)` -> per-image scores and Inception features."""

    def __init__(self, metrics: Sequence[str], weights: str, *, batch_size: int = 32):
        from flowsteer_jax.evaluation import clip_scores, fid, hps

        self.metrics, self.text, self.inception = list(metrics), {}, None
        for m in self.metrics:
            if m == "pickscore":
                self.text[m] = clip_scores.PickScorer.from_weights(weights, batch_size=batch_size)
            elif m == "clip":
                self.text[m] = clip_scores.ClipScorer.from_weights(weights, batch_size=batch_size)
            elif m == "hps":
                hps.find_weights(weights)  # a missing weights file is the first thing to say
                tokenizer, tok_folder = _hps_tokenizer(weights)
                self.text[m] = hps.HPSScorer.from_weights(weights, tokenizer, batch_size=batch_size)
                self.text[m].provenance = {**self.text[m].provenance, "tokenizer_folder": tok_folder}
        if "fid" in self.metrics or "kid" in self.metrics:
            self.inception = fid.InceptionFeatures.from_weights(weights, batch_size=batch_size)

    @property
    def provenance(self) -> dict[str, Any]:
        out = {m: s.provenance for m, s in self.text.items()}
        if self.inception is not None:
            out["inception"] = self.inception.provenance
        return out

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-image scores on the tables' scale (`hps` x 100) and, for FID/KID, `features` (N, 2048)."""
        out = {}
        for m, scorer in self.text.items():
            s = np.asarray(scorer(images, prompts), np.float64)
            out[m] = 100.0 * s if m == "hps" else s
        if self.inception is not None:
            out["features"] = self.inception(images)
        return out


def summarize(per_image: dict[str, np.ndarray], ref_features: np.ndarray | None, metrics: Sequence[str]) -> dict:
    """Row metrics (JSON keys of `METRICS`) from accumulated per-image scores; `kid_std` beside `kid`."""
    from flowsteer_jax.evaluation import fid

    out = {}
    for m in metrics:
        key = METRICS[m][0]
        if m in TEXT_METRICS:
            out[key] = float(np.mean(per_image[m]))
        elif m == "fid":
            out[key] = float(fid.fid(per_image["features"], ref_features))
        elif m == "kid":
            mean, std = fid.kid(per_image["features"], ref_features)
            out[key], out["kid_std"] = float(mean), float(std)
    return out


def score_files(
    files: Sequence[str], prompts: Sequence[str] | None, scorers: Scorers, *, desc: str
) -> dict[str, np.ndarray]:
    """Score image files in chunks of `CHUNK` (memory stays flat for 10k images); concatenated per-image arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(files), CHUNK), desc=desc, unit="chunk"):
        chunk = files[start : start + CHUNK]
        images = [open_rgb(p) for p in chunk]
        texts = prompts[start : start + CHUNK] if prompts is not None else [""] * len(chunk)
        for k, v in scorers.score(images, texts).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({e})") from e


def folder_features(inception: Any, files: Sequence[str], desc: str = "reference features") -> np.ndarray:
    """Inception features of image files, read lazily in chunks (a 10k-image reference set never sits in memory)."""
    from flowsteer_jax.evaluation.fid import ImageFiles

    step = 4 * CHUNK
    parts = [
        inception(ImageFiles(files[s : s + step])) for s in tqdm(range(0, len(files), step), desc=desc, unit="chunk")
    ]
    return np.concatenate(parts)


def resolve(setting: str, weights: str | None, ref: str | None) -> list[str]:
    """`eval.metrics` ("auto", "" or a comma list) -> metric names; "auto" = what `weights` (and `ref`) allow."""
    if setting == "auto":
        return available_metrics(weights, ref)
    names = [m for m in setting.split(",") if m]
    if names and not weights:
        raise InputError(f"eval.metrics={setting!r} needs eval.weights (the folder of the metrics' weight files)")
    if ("fid" in names or "kid" in names) and not ref:
        raise InputError("eval.metrics fid/kid need eval.ref (a folder of real images)")
    return names


def eval_scorer(
    setting: str, weights: str | None, ref: str | None, *, batch_size: int = 32
) -> Callable[[np.ndarray, Sequence[str]], dict[str, float]] | None:
    """Training's `eval.metrics`: a function of (NHWC images in [0, 1], their prompts) -> {metric key: value}, or
    None when no metric applies. The scorers and the reference's Inception features load once, here."""
    for what, path in (("eval.weights", weights), ("eval.ref", ref)):
        if path and not os.path.isdir(path):
            raise InputError(f"{what}={path}: no such folder")
    names = resolve(setting, weights or None, ref or None)
    if not names:
        return None
    scorers = Scorers(names, weights, batch_size=batch_size)
    ref_features = None
    if scorers.inception is not None:
        from flowsteer_jax.evaluation.fid import image_files

        ref_features = folder_features(scorers.inception, image_files(ref))

    def score(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        pixels = np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        per_image = scorers.score([Image.fromarray(p) for p in pixels], list(prompts))
        return summarize(per_image, ref_features, names)

    return score
