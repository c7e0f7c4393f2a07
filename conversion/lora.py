"""LoRA adapters: our flat Flax LoRA params <-> diffusers/PEFT state dicts, and merging into base weights.

Ours (`flowsteer_jax/models/lora.py`): per adapted `nnx.Linear` at Flax path `P`, `P.lora_a (in, r)` and
`P.lora_b (r, out)`; the layer computes `y = x @ W + b + scale * (x @ A) @ B` with `scale = alpha / rank`.
PEFT/diffusers: `transformer.<torch module>.lora_A.weight (r, in)` and `.lora_B.weight (out, r)`, computing
`y = x W^T + b + (alpha / r) * B (A x)`. `to_peft` folds our scale into `lora_B`, so the file has no alpha keys and
PEFT's default `alpha = r` (scale 1) reproduces our layer. The Flax module path <-> torch module name mapping
comes from the transformer's `param_table` (the same table the weight loader uses): no string rewriting.

Published SD3 LoRAs come in other layouts too. `from_state_dict` reads each (detected from the keys, `LAYOUTS`) into
our flat form, and `to_layout` writes each (the tests' fixtures, and a way to hand our LoRA to those tools):

- `peft`: diffusers module names, `lora_A`/`lora_B` (or `lora.down`/`lora.up`), prefix `transformer.`,
  `base_model.model.` (PEFT `save_pretrained`; Flash-SD3) or none.
- `kohya`: `lora_unet_<SAI module, dots as underscores>` (kohya sd-scripts `networks/lora_sd3.py`, SAI's trainers):
  SAI's MMDiT names (`joint_blocks.{i}.x_block.attn.qkv`), q, k and v fused into one `qkv` Linear.
- `comfyui`: `diffusion_model.<SAI module>`, what ComfyUI's LoRA save writes (SAI names, fused qkv).
- `onetrainer`: `lora_transformer_<diffusers module, dots as underscores>`, what `export --format=comfyui` writes.

All but `peft` use `lora_down (r, in)`/`lora_up (out, r)` plus an optional scalar `.alpha` (any of the three
naming pairs is read in any layout): the delta is `up @ down * alpha / r`, and `alpha / r = 1` without one.
A fused `qkv` LoRA has one down (rank r) and one up with `3 * dim` rows: q, k and v get the up's thirds and share
the down. SAI's final `adaLN_modulation` Linears (`final_layer`, the last block's `context_block`) output
(shift, scale) where diffusers' output (scale, shift) (ComfyUI's `swap_scale_shift`): their up rows are swapped.

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
# The layouts `from_state_dict` reads and `to_layout` writes: layout -> (key prefixes, module names, separator).
# The first prefix is the one written; `peft` also reads PEFT `save_pretrained`'s wrapper prefix and bare names.
LAYOUTS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "peft": ((PREFIX, "base_model.model.", ""), "diffusers", "."),
    "kohya": (("lora_unet_",), "sai", "_"),
    "comfyui": (("diffusion_model.",), "sai", "."),
    "onetrainer": ((COMFYUI_PREFIX,), "diffusers", "_"),
}
# key suffix -> role; written: peft's pair, or the down/up pair with `.alpha`
_ROLES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
# diffusers module under `transformer_blocks.{i}.` -> (SAI module under `joint_blocks.{i}.`, its part of a fused Linear)
_SAI_BLOCK = {
    **{f"attn.to_{c}": ("x_block.attn.qkv", i) for i, c in enumerate("qkv")},
    **{f"attn.add_{c}_proj": ("context_block.attn.qkv", i) for i, c in enumerate("qkv")},
    **{f"attn2.to_{c}": ("x_block.attn2.qkv", i) for i, c in enumerate("qkv")},
    "attn.to_out.0": ("x_block.attn.proj", 0),
    "attn2.to_out.0": ("x_block.attn2.proj", 0),
    "attn.to_add_out": ("context_block.attn.proj", 0),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0),
    "ff.net.2": ("x_block.mlp.fc2", 0),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0),
    "ff_context.net.2": ("context_block.mlp.fc2", 0),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
}
_SAI_TOP = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
# the AdaLayerNormContinuous Linears: (scale, shift) in diffusers, (shift, scale) in SAI's MMDiT
_SWAPPED = ("norm_out.linear", "norm1_context.linear")


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
    """Dotted Flax module path -> its ComfyUI/kohya key stem (`lora_transformer_transformer_blocks_0_attn_to_q`):
    the `onetrainer` layout's names."""
    return {parts[0][0]: stem for stem, parts in layout_modules(table_or_config, "onetrainer").items()}


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


def _sai_name(module: str) -> tuple[str, int] | None:
    """(SAI's MMDiT module name, part) of a diffusers Linear (`transformer_blocks.3.attn.to_k` ->
    `joint_blocks.3.x_block.attn.qkv`, part 1 of the fused qkv); None for a Linear SAI's MMDiT does not have."""
    head, _, rest = module.partition(".")
    if head == "transformer_blocks":
        block, _, rest = rest.partition(".")
        if rest in _SAI_BLOCK:
            name, part = _SAI_BLOCK[rest]
            return f"joint_blocks.{block}.{name}", part
        return None
    return (_SAI_TOP[module], 0) if module in _SAI_TOP else None


def layout_modules(
    table_or_config: Iterable[Entry] | Mapping[str, Any], layout: str
) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The module names of `layout` (as written, with its first prefix) -> the parts of the file's Linear:
    `[(our dotted module path, rows)]`, `rows` being the file's output rows that make that module's output, in
    its order (all of them, or a third of a fused qkv, or swapped halves).

    Strict: names that collide once dots become underscores raise ConversionError (SD3's never do).
    """
    prefixes, names, sep = LAYOUTS[layout]
    groups: dict[str, list[tuple[int, str, Entry]]] = {}
    for path, entry in linear_modules(table_or_config).items():
        module = torch_module(entry)
        if names == "diffusers":
            name, part = module, 0
        else:
            sai = _sai_name(module)
            if sai is None:
                continue
            name, part = sai
        groups.setdefault(prefixes[0] + name.replace(".", sep), []).append((part, path, entry))
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for stem, parts in groups.items():
        if sorted(p for p, _, _ in parts) != list(range(len(parts))):
            raise ConversionError(f"{layout} LoRA names collide for this transformer at {stem!r}")
        rows, start = [], 0
        for _, path, entry in sorted(parts, key=lambda x: x[0]):
            d_in, d_out = entry.flax_shape
            r = np.arange(start, start + d_out)
            if names == "sai" and torch_module(entry).endswith(_SWAPPED) and d_out == 2 * d_in:
                r = np.concatenate([r[d_in:], r[:d_in]])
            rows.append((path, r))
            start += d_out
        out[stem] = rows
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


def from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    adapter_metadata: str | None = None,
) -> tuple[dict[str, np.ndarray], int, str]:
    """A LoRA state dict in any of `LAYOUTS` -> (our flat LoRA, rank, layout), the layout detected from the keys.

    `alpha / r` (when an `.alpha` key is there) is folded into lora_B; so is the scale diffusers'
    `adapter_metadata` (the file's `lora_adapter_metadata`, `adapter_scales`; read for the `peft` layout, whose
    names are diffusers') gives, as diffusers applies it: the result applies with layer scale 1.
    Arrays come back float32. `rank` is the largest adapter rank. Strict: keys of no layout raise one
    ConversionError naming an example key; in the detected layout, every key must name a Linear of this
    transformer with both halves, else ConversionError naming the keys.
    """
    table = _table(table_or_config)
    parsed: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for key in state_dict:
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        if suffix is None:
            problems.append(
                f"{key!r}: not a LoRA key (expected <module>.lora_A/lora_B.weight, lora_down/lora_up.weight, "
                "lora.down/lora.up.weight or .alpha)"
            )
        else:
            parsed[key] = (key[: -len(suffix)], _ROLES[suffix])
    # every layout's names under each of its prefixes
    known = {
        layout: {
            prefix + stem[len(prefixes[0]) :]: parts
            for stem, parts in layout_modules(table, layout).items()
            for prefix in prefixes
        }
        for layout, (prefixes, _, _) in LAYOUTS.items()
    }
    hits = {layout: sum(stem in names for stem, _ in parsed.values()) for layout, names in known.items()}
    layout = max(hits, key=hits.get)
    if not hits[layout]:
        example = sorted(state_dict)[0] if state_dict else None
        raise ConversionError(
            f"not an SD3 transformer LoRA in a layout this reads ({', '.join(LAYOUTS)}); example key {example!r}"
        )
    names = known[layout]
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, (stem, role) in parsed.items():
        if stem not in names:
            hint = " (text-encoder LoRAs are not applied)" if stem.startswith(("lora_te", "text_encoder")) else ""
            problems.append(f"{key!r}: {stem!r} maps to no Linear layer of this transformer ({layout} layout){hint}")
        elif role in groups.setdefault(stem, {}):
            problems.append(f"{key!r}: a second {role!r} tensor for {stem!r} (two naming schemes mixed?)")
        else:
            groups[stem][role] = np.asarray(state_dict[key])
    scales = None
    if adapter_metadata is not None and layout == "peft":
        diffusers = {stem: next(stem[len(x) :] for x in LAYOUTS["peft"][0] if stem.startswith(x)) for stem in groups}
        by_module = adapter_scales(adapter_metadata, diffusers.values())
        scales = None if by_module is None else {stem: by_module[m] for stem, m in diffusers.items()}
    flat: dict[str, np.ndarray] = {}
    ranks = []
    for stem, p in groups.items():
        if "down" not in p or "up" not in p:
            problems.append(f"{stem!r}: needs both the A/down and the B/up matrix, has {sorted(p)}")
            continue
        down, up = p["down"].astype(np.float32), p["up"].astype(np.float32)
        rows = sum(len(r) for _, r in names[stem])
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or up.shape[0] != rows:
            problems.append(f"{stem!r}: down {down.shape} and up {up.shape} are not (r, in) and ({rows}, r)")
            continue
        rank = down.shape[0]
        b = up.T
        if "alpha" in p and scales is not None:
            problems.append(f"{stem!r}: an .alpha key and {LORA_ADAPTER_METADATA_KEY} both give its scale")
            continue
        if "alpha" in p:
            b = b * np.float32(float(np.asarray(p["alpha"], np.float32).reshape(())) / rank)
        if scales is not None:
            scale, meta_rank = scales[stem]
            if meta_rank != rank:
                problems.append(f"{stem!r}: rank {rank}, but {LORA_ADAPTER_METADATA_KEY} says r = {meta_rank}")
                continue
            if scale != 1.0:
                b = b * np.float32(scale)
        ranks.append(rank)
        for path, r in names[stem]:
            if f"{path}.lora_a" in flat:
                problems.append(f"{stem!r}: a second adapter for {path!r} (two prefixes mixed?)")
            flat[f"{path}.lora_a"] = np.ascontiguousarray(down.T)
            flat[f"{path}.lora_b"] = np.ascontiguousarray(b[:, r])
    if problems:
        raise ConversionError(
            f"LoRA state dict ({layout} layout) does not match the transformer:\n  " + "\n  ".join(problems)
        )
    if not flat:
        raise ConversionError("LoRA state dict holds no adapters")
    lora_pairs(flat, table)  # shapes against the model
    return flat, max(ranks), layout


def to_layout(
    flat_lora: Mapping[str, np.ndarray],
    scale: float,
    table_or_config: Iterable[Entry] | Mapping[str, Any],
    layout: str,
    *,
    alpha: float | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """Our flat LoRA (layer scale `scale`) -> a state dict in `layout` that applies the same deltas.

    `peft` writes `lora_A`/`lora_B`, the others `lora_down`/`lora_up`. With `alpha`, every module gets an `.alpha`
    key and its up matrix is stored divided by `alpha / r` (what the loaders multiply back); without, the scale
    is folded into up and there are no alpha keys. Parts of one fused Linear (SAI's qkv) whose A matrices are
    equal share one down matrix (a kohya LoRA read back is written as it was); otherwise their downs are stacked
    and the up is block-diagonal, rank the sum of theirs. `dtype`: of down/up (default: that of `lora_a`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; one of {list(LAYOUTS)}")
    pairs = lora_pairs(flat_lora, table_or_config)
    down_key, up_key = (
        (".lora_A.weight", ".lora_B.weight") if layout == "peft" else (".lora_down.weight", ".lora_up.weight")
    )
    out: dict[str, np.ndarray] = {}
    for stem, parts in layout_modules(table_or_config, layout).items():
        present = [(pairs[path][1], pairs[path][2], r) for path, r in parts if path in pairs]
        if not present:
            continue
        a0 = present[0][0]
        shared = all(np.array_equal(a, a0) for a, _, _ in present)
        downs = [a0] if shared else [a for a, _, _ in present]
        rank = sum(a.shape[1] for a in downs)
        factor = float(scale) * (rank / float(alpha) if alpha is not None else 1.0)
        up = np.zeros((sum(len(r) for _, r in parts), rank), np.float32)
        col = 0
        for a, b, r in present:
            b32 = b.astype(np.float32) * np.float32(factor) if factor != 1.0 else b.astype(np.float32)
            up[r, col : col + a.shape[1]] = b32.T
            col += 0 if shared else a.shape[1]
        dt = np.dtype(dtype) if dtype is not None else a0.dtype
        down = np.concatenate([a.astype(np.float32).T for a in downs])
        out[stem + down_key] = np.ascontiguousarray(down.astype(dt))
        out[stem + up_key] = np.ascontiguousarray(up.astype(dt))
        if alpha is not None:
            out[stem + ".alpha"] = np.asarray(alpha, np.float32)
    return out


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
