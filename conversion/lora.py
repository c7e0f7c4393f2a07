"""LoRA adapters: our flat Flax LoRA params <-> diffusers/PEFT state dicts, and merging into base weights.

Ours (`flowsteer_jax/models/lora.py`): per adapted `nnx.Linear` at Flax path `P`, `P.lora_a (in, r)` and
`P.lora_b (r, out)`; the layer computes `y = x @ W + b + scale * (x @ A) @ B` with `scale = alpha / rank`.
PEFT/diffusers: `transformer.<torch module>.lora_A.weight (r, in)` and `.lora_B.weight (out, r)`, computing
`y = x W^T + b + (alpha / r) * B (A x)`. `to_peft` folds our scale into `lora_B`, so the file has no alpha keys and
PEFT's default `alpha = r` (scale 1) reproduces our layer. The Flax module path <-> torch module name mapping
comes from the transformer's `param_table` (the same table the weight loader uses): no string rewriting.

Pure numpy: never imports flowsteer_jax or torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from conversion import sd3_transformer
from conversion.safetensors_io import ConversionError
from conversion.table import Entry, path_str

LORA_LEAVES = ("lora_a", "lora_b")
PEFT_FILE = "pytorch_lora_weights.safetensors"
# The ComfyUI/kohya-style file: `lora_transformer_<diffusers module, dots as underscores>.lora_down.weight (r, in)`,
# `.lora_up.weight (out, r)` and `.alpha` (a scalar; scale = alpha / r). ComfyUI's SD3 key map
# (`comfy/lora.py::model_lora_keys_unet`) accepts this prefix (OneTrainer's) next to `transformer.<module>`;
# `lora_unet_` there means SAI's own module names (`joint_blocks_0_x_block_attn_qkv`), not diffusers'.
COMFYUI_FILE = "comfyui_lora.safetensors"
COMFYUI_PREFIX = "lora_transformer_"
PREFIX = "transformer."
# diffusers reads this `__metadata__` key of a LoRA file as the PEFT LoraConfig of each component, its keys
# prefixed `transformer.` (diffusers/loaders/lora_base.py::LORA_ADAPTER_METADATA_KEY, `_pack_dict_with_prefix`).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Module-level prefixes accepted on reading: diffusers' pipeline prefix, PEFT `save_pretrained`'s wrapper.
_READ_PREFIXES = ("transformer.", "base_model.model.")
# key suffix -> (role, naming scheme)
_SUFFIXES = {
    ".lora_A.weight": ("a", "peft"),
    ".lora_B.weight": ("b", "peft"),
    ".lora.down.weight": ("a", "down/up"),
    ".lora.up.weight": ("b", "down/up"),
    ".alpha": ("alpha", "any"),
}


def _table(table_or_config: Iterable[Entry] | Mapping[str, Any]) -> list[Entry]:
    if isinstance(table_or_config, Mapping):
        return sd3_transformer.param_table(table_or_config)
    return list(table_or_config)


def linear_modules(table_or_config: Iterable[Entry] | Mapping[str, Any]) -> dict[str, Entry]:
    """Dotted Flax module path (`transformer_blocks.0.attn.to_q`) -> its kernel's table entry, for every Linear."""
    return {
        path_str(e.flax_path[:-1]): e
        for e in _table(table_or_config)
        if e.kind == "linear" and e.flax_path[-1] == "kernel"
    }


def torch_module(entry: Entry) -> str:
    """The diffusers module name of a Linear's kernel entry (`...to_q.weight` -> `...to_q`)."""
    assert entry.torch_key.endswith(".weight"), entry
    return entry.torch_key[: -len(".weight")]


def lora_pairs(
    flat_lora: Mapping[str, np.ndarray], table_or_config: Iterable[Entry] | Mapping[str, Any]
) -> dict[str, tuple[Entry, np.ndarray, np.ndarray]]:
    """Check flat LoRA params against the model and group them: `module path -> (kernel entry, A, B)`.

    Strict: a leaf other than `lora_a`/`lora_b`, a module that is not a Linear of this model, a lone `lora_a`
    or `lora_b`, or shapes that do not fit `(in, r)`/`(r, out)` raise one ConversionError naming each key.
    """
    modules = linear_modules(table_or_config)
    parts: dict[str, dict[str, np.ndarray]] = {}
    problems: list[str] = []
    for key, value in flat_lora.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in LORA_LEAVES:
            problems.append(f"{key!r}: not a LoRA parameter (expected <module>.lora_a / <module>.lora_b)")
        elif module not in modules:
            problems.append(f"{key!r}: {module!r} is no Linear layer of this transformer")
        else:
            parts.setdefault(module, {})[leaf] = np.asarray(value)
    out: dict[str, tuple[Entry, np.ndarray, np.ndarray]] = {}
    for module, p in parts.items():
        if set(p) != set(LORA_LEAVES):
            problems.append(f"{module!r}: has {sorted(p)} but needs both lora_a and lora_b")
            continue
        a, b = p["lora_a"], p["lora_b"]
        d_in, d_out = modules[module].flax_shape
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != d_in or b.shape[1] != d_out or a.shape[1] != b.shape[0]:
            problems.append(
                f"{module!r}: lora_a {a.shape} / lora_b {b.shape} do not fit a ({d_in} -> {d_out}) Linear "
                f"(expected ({d_in}, r) and (r, {d_out}))"
            )
            continue
        out[module] = (modules[module], a, b)
    if problems:
        raise ConversionError("LoRA parameters do not match the transformer:\n  " + "\n  ".join(problems))
    if not out:
        raise ConversionError("no LoRA parameters")
    return out


def to_peft(
    flat_lora: Mapping[str, np.ndarray],
    scale: float,
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    *,
    dtype: Any = None,
    prefix: str = PREFIX,
) -> dict[str, np.ndarray]:
    """Our flat LoRA -> diffusers/PEFT state dict (`transformer.<module>.lora_A.weight (r, in)`,
    `.lora_B.weight (out, r)`), `scale` (= alpha / rank, times any user scale) folded into lora_B in float32.

    `dtype`: output dtype (default: that of `lora_a`). No alpha keys: PEFT's default `alpha = r` is scale 1.
    """
    out: dict[str, np.ndarray] = {}
    for _, (entry, a, b) in lora_pairs(flat_lora, table_or_config).items():
        dt = np.dtype(dtype) if dtype is not None else a.dtype
        name = prefix + torch_module(entry)
        b32 = b.astype(np.float32)
        if float(scale) != 1.0:
            b32 = b32 * np.float32(scale)
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.astype(np.float32).T.astype(dt))
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b32.T.astype(dt))
    return out


def comfyui_names(table_or_config: Iterable[Entry] | Mapping[str, Any]) -> dict[str, str]:
    """Dotted Flax module path -> its ComfyUI/kohya key stem (`lora_transformer_transformer_blocks_0_attn_to_q`)."""
    out = {
        path: COMFYUI_PREFIX + torch_module(e).replace(".", "_") for path, e in linear_modules(table_or_config).items()
    }
    if len(set(out.values())) != len(out):  # underscores in module names could collide; SD3's never do
        raise ConversionError("ComfyUI LoRA names collide for this transformer")
    return out


def to_comfyui(
    flat_lora: Mapping[str, np.ndarray],
    alpha: float,
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    *,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """Our flat LoRA -> the ComfyUI/kohya layout: `<stem>.lora_down.weight (r, in)`, `<stem>.lora_up.weight
    (out, r)` (not scaled) and `<stem>.alpha` (float32 scalar `alpha`), so loaders apply `alpha / r` as we do.

    `dtype`: of the down/up matrices (default: that of `lora_a`).
    """
    names = comfyui_names(table_or_config)
    out: dict[str, np.ndarray] = {}
    for module, (_, a, b) in lora_pairs(flat_lora, table_or_config).items():
        dt = np.dtype(dtype) if dtype is not None else a.dtype
        stem = names[module]
        out[f"{stem}.lora_down.weight"] = np.ascontiguousarray(a.astype(np.float32).T.astype(dt))
        out[f"{stem}.lora_up.weight"] = np.ascontiguousarray(b.astype(np.float32).T.astype(dt))
        out[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
    return out


def adapter_scales(adapter_metadata: str, modules: Iterable[str]) -> dict[str, tuple[float, int]] | None:
    """diffusers' `lora_adapter_metadata` (the JSON a LoRA file keeps in its `__metadata__`) -> `{module: (scale,
    r)}` for each of `modules` (diffusers module names): the scale PEFT gives it, `alpha / r` (`alpha / sqrt(r)`
    with `use_rslora`), `alpha_pattern`/`rank_pattern` matched as PEFT's `get_pattern_key` does, LoraConfig's
    defaults (r = alpha = 8) for what is absent. None when it holds no `transformer.` config. ConversionError for
    JSON that is not a config, or DoRA (not a scale)."""
    try:
        packed = json.loads(adapter_metadata)
    except ValueError as e:
        raise ConversionError(f"{LORA_ADAPTER_METADATA_KEY} is not JSON ({e})") from e
    if not isinstance(packed, dict):
        raise ConversionError(f"{LORA_ADAPTER_METADATA_KEY} is not a JSON object")
    config = {k.removeprefix(PREFIX): v for k, v in packed.items() if k.startswith(PREFIX)}
    if not config:
        return None
    if config.get("use_dora"):
        raise ConversionError(f"{LORA_ADAPTER_METADATA_KEY}: a DoRA adapter (use_dora), which is not supported")

    def pattern(table: Mapping[str, Any], module: str, default: Any) -> Any:
        for key in table:
            if re.match(rf"(.*\.)?({key})$", module):
                return table[key]
        return default

    out = {}
    for module in modules:
        r = int(pattern(config.get("rank_pattern") or {}, module, config.get("r", 8)))
        alpha = float(pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        out[module] = (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r, r)
    return out


def from_peft(
    state_dict: Mapping[str, np.ndarray],
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    adapter_metadata: str | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """diffusers/PEFT (`lora_A`/`lora_B`) or older (`lora.down`/`lora.up`) LoRA state dict -> (our flat LoRA, rank).

    Keys may carry the `transformer.` (or PEFT's `base_model.model.`) prefix or none. An optional
    `<module>.alpha` is folded into lora_B as `alpha / r`; so is the scale diffusers' `adapter_metadata` (the
    file's `lora_adapter_metadata`, `adapter_scales`) gives, as diffusers applies it: the result applies with layer
    scale 1. Arrays come back float32. `rank` is the largest adapter rank (each adapter's own is its arrays'
    shape). Strict: every key must name a Linear of this transformer, with both halves, and agree with the
    metadata's rank; else ConversionError naming the keys.
    """
    by_torch = {torch_module(e): path for path, e in linear_modules(table_or_config).items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        name = key
        for p in _READ_PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                break
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key!r}: not a LoRA key (expected <module>.lora_A/lora_B.weight or lora.down/up.weight)")
            continue
        module = name[: -len(suffix)]
        if module not in by_torch:
            problems.append(f"{key!r}: {module!r} maps to no Linear layer of this transformer")
            continue
        role = _SUFFIXES[suffix][0]
        if role in parts.setdefault(module, {}):
            problems.append(f"{key!r}: a second {role!r} tensor for {module!r} (two naming schemes mixed?)")
            continue
        parts[module][role] = np.asarray(value)
    scales = adapter_scales(adapter_metadata, parts) if adapter_metadata is not None else None
    flat: dict[str, np.ndarray] = {}
    ranks = []
    for module, p in parts.items():
        if "a" not in p or "b" not in p:
            problems.append(f"{module!r}: needs both the A/down and the B/up matrix, has {sorted(p)}")
            continue
        a_t, b_t = p["a"].astype(np.float32), p["b"].astype(np.float32)
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != b_t.shape[1]:
            problems.append(f"{module!r}: A {a_t.shape} and B {b_t.shape} are not (r, in) and (out, r)")
            continue
        rank = a_t.shape[0]
        b = b_t.T
        if "alpha" in p and scales is not None:
            problems.append(f"{module!r}: an .alpha key and {LORA_ADAPTER_METADATA_KEY} both give its scale")
            continue
        if "alpha" in p:
            b = b * np.float32(float(np.asarray(p["alpha"]).reshape(())) / rank)
        if scales is not None:
            scale, meta_rank = scales[module]
            if meta_rank != rank:
                problems.append(f"{module!r}: rank {rank}, but {LORA_ADAPTER_METADATA_KEY} says r = {meta_rank}")
                continue
            if scale != 1.0:
                b = b * np.float32(scale)
        ranks.append(rank)
        path = by_torch[module]
        flat[f"{path}.lora_a"] = np.ascontiguousarray(a_t.T)
        flat[f"{path}.lora_b"] = np.ascontiguousarray(b)
    if problems:
        raise ConversionError("LoRA state dict does not match the transformer:\n  " + "\n  ".join(problems))
    if not flat:
        raise ConversionError("LoRA state dict holds no adapters")
    lora_pairs(flat, table_or_config)  # shapes against the model
    return flat, max(ranks)


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """`scale * A @ B` in float32, Flax layout `(in, out)`."""
    return np.float32(scale) * (a.astype(np.float32) @ b.astype(np.float32))


def fuse(
    base: Mapping[Any, np.ndarray],
    flat_lora: Mapping[str, np.ndarray],
    scale: float,
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    *,
    dtype: Any = None,
) -> dict[Any, np.ndarray]:
    """Merge `W + scale * A @ B` into base weights; returns a new dict (untouched entries are the same arrays).

    `base` is either a diffusers state dict (`...to_q.weight (out, in)`) or flat Flax params keyed by path tuple
    or dotted path (`...to_q.kernel (in, out)`). Computed in float32, cast back to each weight's dtype (or `dtype`).
    """
    out = dict(base)
    for module, (entry, a, b) in lora_pairs(flat_lora, table_or_config).items():
        if entry.torch_key in base:
            key, transpose = entry.torch_key, True
        elif entry.flax_path in base:
            key, transpose = entry.flax_path, False
        elif path_str(entry.flax_path) in base:
            key, transpose = path_str(entry.flax_path), False
        else:
            raise ConversionError(f"fuse: no base weight for LoRA module {module!r} ({entry.torch_key!r})")
        w = np.asarray(base[key])
        d = delta(a, b, scale)
        d = d.T if transpose else d
        if w.shape != d.shape:
            raise ConversionError(f"fuse: {key!r} has shape {w.shape}, the LoRA update {d.shape}")
        out[key] = (w.astype(np.float32) + d).astype(w.dtype if dtype is None else dtype)
    return out
