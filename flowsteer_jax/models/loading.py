"""Load and save diffusers-format model folders as NNX modules (weights converted by `conversion/`).

Loading builds the module abstractly (`nnx.eval_shape`, no allocation), then reads, converts, casts and places
one tensor at a time: with a mesh (argument or `jax.set_mesh`) each weight goes straight to its sharding, and a
bf16 checkpoint loaded as bf16 is never widened to fp32.

`read_lora` reads a LoRA for the transformer (a PEFT/diffusers file or folder, or a training workdir) into the
`(A, B)` pairs that `flowsteer_jax.models.lora.set_lora` applies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from conversion import clip as clip_conv
from conversion import lora as lora_conv
from conversion import sd3_transformer, training_checkpoint
from conversion import t5 as t5_conv
from conversion import vae as vae_conv
from conversion.errors import InputError
from conversion.safetensors_io import (
    Checkpoint,
    ConversionError,
    folder_fingerprint,
    open_checkpoint,
    open_safetensors,
    read_json,
    save_checkpoint,
    weights_fingerprint,
)
from conversion.table import Entry, check_checkpoint, to_torch_state
from flowsteer_jax.models.mmdit import MMDiT, MMDiTConfig
from flowsteer_jax.models.text.clip import CLIPText, CLIPTextConfig
from flowsteer_jax.models.text.t5 import T5Config, T5Encoder
from flowsteer_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from flowsteer_jax.parallel import DEFAULT_RULES, MeshAxes, current_mesh, variable_sharding


def load_weights(
    build: Callable[[], nnx.Module],
    folder: str,
    table: Iterable[Entry],
    config_path: str,
    dtype: jnp.dtype,
    mesh: Mesh | None,
    rules: Mapping[str, MeshAxes],
) -> nnx.Module:
    """The module `build()` makes, with every weight read from `folder` through the key `table` (strict: one
    ConversionError names every unknown, missing or mis-shaped key), one tensor at a time, cast to `dtype` and put
    straight into its sharding on `mesh` (default: the one set with `jax.set_mesh`, else none)."""
    return fill_weights(build, open_checkpoint(folder), table, config_path, dtype, mesh, rules)


def fill_weights(
    build: Callable[[], nnx.Module],
    ckpt: Checkpoint,
    table: Iterable[Entry],
    config_path: str,
    dtype: jnp.dtype,
    mesh: Mesh | None,
    rules: Mapping[str, MeshAxes],
) -> nnx.Module:
    """`load_weights` from an opened `Checkpoint` (or a view of one: a single file, keys left out) instead of a
    folder. A tensor whose shape the view reports differently with the same size (a (1,) scalar) is reshaped."""
    table = list(table)
    check_checkpoint(ckpt, table, config_path)
    mesh = mesh if mesh is not None else current_mesh()
    graphdef, state = nnx.split(nnx.eval_shape(build))
    variables = dict(nnx.to_flat_state(state))
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - {e.flax_path for e in table})
    if unfilled:  # a variable no checkpoint tensor fills would silently keep its random init
        raise ValueError(f"{config_path}: model variables with no checkpoint entry: {unfilled}")
    for entry in table:
        var = variables[entry.flax_path]
        value = np.asarray(entry.to_flax(ckpt.load(entry.torch_key))).astype(dtype, copy=False)
        value = value.reshape(entry.flax_shape)  # a no-op unless the view reported another shape of this size
        sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
        var.set_value(jax.device_put(value, sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def load_transformer(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
    remat_policy: str | None = None,
) -> MMDiT:
    """A diffusers `transformer/` folder (config.json + single or sharded safetensors) -> `MMDiT`."""
    raw, config_path = sd3_transformer.read_config(folder)
    cfg = MMDiTConfig.from_diffusers(raw, config_path)

    def build() -> MMDiT:
        return MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation, remat_policy=remat_policy)

    return load_weights(build, folder, sd3_transformer.param_table(raw), config_path, dtype, mesh, rules)


def read_lora(
    path: str, transformer_config: MMDiTConfig | Mapping[str, Any], scale: float = 1.0
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """A LoRA for the transformer of `transformer_config` -> (`{module path: (A (in, r), B (r, out))}`, layer scale).

    `path`: a `.safetensors` file in any layout `conversion.lora.from_state_dict` reads (PEFT/diffusers,
    kohya/SAI `lora_unet_*` with fused qkv, ComfyUI `diffusion_model.*`, OneTrainer `lora_transformer_*`; any
    `.alpha` folded into B; so is the scale of diffusers' `lora_adapter_metadata`), a folder with
    `pytorch_lora_weights.safetensors`, or a training workdir (its latest orbax checkpoint: the run's
    `alpha / rank` joins the layer scale, and its transformer config must equal `transformer_config`). The layer
    scale is `scale` times that. Strict: a file of no known layout, or a key that maps to no Linear of this
    transformer, raises ConversionError naming `path`; FileNotFoundError when `path` is none of the three.
    """
    if isinstance(transformer_config, MMDiTConfig):
        transformer_config = transformer_config.to_diffusers()
    table = sd3_transformer.param_table(transformer_config)
    weights = os.path.join(path, lora_conv.PEFT_FILE) if os.path.isdir(path) else path
    if os.path.isfile(weights):
        with open_safetensors(weights) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            adapter_metadata = (f.metadata() or {}).get(lora_conv.LORA_ADAPTER_METADATA_KEY)
        try:
            flat, _, _ = lora_conv.from_state_dict(state, table, adapter_metadata)
        except ConversionError as e:
            raise ConversionError(f"{weights}: {e}") from e
        layer_scale = float(scale)
    elif os.path.isdir(path):
        training_checkpoint.checkpoint_dir(path)  # a clear error when it is neither a LoRA folder nor a workdir
        flat, meta = training_checkpoint.read_lora(path)
        theirs = sd3_transformer.normalize_config(meta["transformer_config"], f"{path} transformer_config")
        ours = sd3_transformer.normalize_config(transformer_config)
        diff = sorted(k for k in ours if ours[k] != theirs[k])
        if diff:
            raise ConversionError(
                f"{path}: trained on a transformer config that differs from this pipeline's in {diff}"
            )
        lora_cfg = meta["config"]["lora"]
        layer_scale = float(scale) * float(lora_cfg["alpha"]) / float(lora_cfg["rank"])
    else:
        raise FileNotFoundError(f"{path}: no such LoRA file, exported LoRA folder or training workdir")
    try:
        pairs = lora_conv.lora_pairs(flat, table)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e
    return {module: (a, b) for module, (_, a, b) in pairs.items()}, layer_scale


def check_lora(path: str, model_folder: str) -> None:
    """`read_lora` of `path` against the transformer config of the pipeline folder `model_folder`, loading no model:
    the programs run it first, so a bad `--lora` fails at once rather than after the models load."""
    read_lora(path, read_json(os.path.join(pipeline_component(model_folder, "transformer"), "config.json"), "config"))


def flat_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Every variable of `model` (parameters and buffers) as host numpy arrays, by Flax path."""
    return {path: np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(nnx.state(model))}


def transformer_state_dict(model: MMDiT) -> dict[str, np.ndarray]:
    """The diffusers `SD3Transformer2DModel` state dict of `model` (bit-exact, same dtype)."""
    return to_torch_state(flat_params(model), sd3_transformer.param_table(model.config.to_diffusers()))


def save_transformer(model: MMDiT, folder: str, *, max_shard_bytes: int | None = 10 * 2**30) -> None:
    """Write a diffusers `transformer/` folder that `SD3Transformer2DModel.from_pretrained` loads."""
    tensors = transformer_state_dict(model)
    save_checkpoint(tensors, folder, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_diffusers(), f, indent=2)


# --- Text encoders and VAE (transformers `text_encoder*/` and diffusers `vae/` folders) ---


def load_clip(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
) -> CLIPText:
    """A transformers `CLIPTextModel[WithProjection]` folder (config.json + single or sharded safetensors)."""
    raw, config_path = clip_conv.read_config(folder)
    cfg = CLIPTextConfig.from_transformers(raw, config_path)
    table = clip_conv.param_table(raw, clip_conv.torch_prefix(raw, open_checkpoint(folder).keys()))

    def build() -> CLIPText:
        return CLIPText(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation)

    return load_weights(build, folder, table, config_path, dtype, mesh, rules)


def load_t5(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
) -> T5Encoder:
    """A transformers `T5EncoderModel` folder; streams shards one tensor at a time in `dtype` (T5-XXL in bf16)."""
    raw, config_path = t5_conv.read_config(folder)
    cfg = T5Config.from_transformers(raw, config_path)
    ckpt = open_checkpoint(folder)
    table = t5_conv.param_table(raw, ckpt.keys())
    check_checkpoint(ckpt, table, config_path)
    t5_conv.check_tied_embeddings(ckpt)

    def build() -> T5Encoder:
        return T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=implementation)

    return load_weights(build, folder, table, config_path, dtype, mesh, rules)


class TextEncoders(NamedTuple):
    """SD3's three text encoders; `t5` is None for a pipeline saved with `text_encoder_3=None`."""

    clip_l: CLIPText
    clip_g: CLIPText
    t5: T5Encoder | None


def _model_index(folder: str) -> dict | None:
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return None
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{index_path}: not a readable JSON file ({e})") from e
    if not isinstance(index, dict):
        raise InputError(f"{index_path}: not a JSON object")
    return index


def _saved_without(index: dict | None, name: str) -> bool:
    """`model_index.json` says the pipeline was saved without `name` (`[null, null]`, or no entry)."""
    if index is None:
        return False
    entry = index.get(name)
    return entry is None or (isinstance(entry, list) and entry[-1] is None)


def pipeline_component(folder: str, name: str) -> str | None:
    """`folder/name`, or None where the pipeline was saved without it (`model_index.json` says `[null, null]`)."""
    index = _model_index(folder)
    if _saved_without(index, name):
        return None
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        index_path = os.path.join(folder, "model_index.json")
        where = f"{index_path} lists it" if index is not None else "no model_index.json to say it is absent"
        raise ConversionError(f"{folder}: no {name}/ folder ({where})")
    return path


def pipeline_fingerprints(folder: str, names: Iterable[str]) -> dict[str, str | None]:
    """`{name: fingerprint}` of the pipeline components `names`: what a run or a row used, by content, not path.

    The transformer's is its `weights_fingerprint` (what checkpoints record as `base_fingerprint`), every other
    component's its `folder_fingerprint`; None where the pipeline was saved without the component.
    """
    out: dict[str, str | None] = {}
    for name in names:
        path = pipeline_component(folder, name)
        if path is None:
            out[name] = None
        else:
            out[name] = weights_fingerprint(path) if name == "transformer" else folder_fingerprint(path)
    return out


# What each component folder of an SD3 pipeline must hold (weights: `*.safetensors`, single or sharded).
_WEIGHTS = ("config.json", "*.safetensors")
SD3_COMPONENTS = {
    "transformer": _WEIGHTS,
    "vae": _WEIGHTS,
    "text_encoder": _WEIGHTS,
    "text_encoder_2": _WEIGHTS,
    "text_encoder_3": _WEIGHTS,
    "tokenizer": (),
    "tokenizer_2": (),
    "tokenizer_3": (),
}
OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3")  # T5: a pipeline may be saved without it


def check_pipeline(folder: str, names: Iterable[str] = tuple(SD3_COMPONENTS), *, what: str = "model.path") -> None:
    """Check, before loading any, that the diffusers SD3 folder has each component `names` lists and what it needs.

    One `InputError` naming `what` (the config key or flag that gave `folder`) and everything missing. The T5
    components (`OPTIONAL_COMPONENTS`) may be absent where `model_index.json` says so (`[null, null]`).
    """
    if not folder:
        raise InputError(f"{what} is empty: set it to a diffusers SD3 pipeline folder")
    if not os.path.isdir(folder):
        raise InputError(f"{what}={folder!r}: no such folder (expected a diffusers SD3 pipeline)")
    index = _model_index(folder)
    missing = []
    for name in names:
        path = os.path.join(folder, name)
        if name in OPTIONAL_COMPONENTS and _saved_without(index, name):
            continue
        if name in OPTIONAL_COMPONENTS and index is None and not os.path.exists(path):
            continue  # no model_index.json to say so: T5 is optional, as the loaders treat it
        if not os.path.isdir(path):
            missing.append(f"{name}/")
            continue
        files = os.listdir(path)
        need = [
            pattern
            for pattern in SD3_COMPONENTS.get(name, ())
            if not any(f == pattern or (pattern.startswith("*") and f.endswith(pattern[1:])) for f in files)
        ]
        if not files:
            missing.append(f"{name}/ (empty)")
        elif need:
            missing.append(f"{name}/{' and '.join(need)}")
    if missing:
        raise InputError(f"{what}={folder!r} is not a complete diffusers SD3 pipeline: missing {', '.join(missing)}")


def load_text_encoders(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    t5: bool = True,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    implementation: str | None = None,
) -> TextEncoders:
    """`text_encoder/` (CLIP-L), `text_encoder_2/` (CLIP-G), `text_encoder_3/` (T5) of a diffusers SD3 folder.

    `t5=False` skips the T5 encoder (9.5 GB in bf16) as diffusers' `text_encoder_3=None` does: its tokens
    become zeros in `encode_prompt`.
    """
    kw = dict(mesh=mesh, rules=rules, implementation=implementation)
    clip_l = load_clip(pipeline_component(folder, "text_encoder"), dtype, **kw)
    clip_g = load_clip(pipeline_component(folder, "text_encoder_2"), dtype, **kw)
    t5_folder = pipeline_component(folder, "text_encoder_3") if t5 else None
    return TextEncoders(clip_l, clip_g, None if t5_folder is None else load_t5(t5_folder, dtype, **kw))


def load_vae(
    folder: str,
    dtype: jnp.dtype = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> AutoencoderKL:
    """A diffusers `vae/` folder (config.json + single or sharded safetensors) -> `AutoencoderKL` (NHWC)."""
    raw, config_path = vae_conv.read_config(folder)
    cfg = AutoencoderKLConfig.from_diffusers(raw, config_path)

    def build() -> AutoencoderKL:
        return AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype)

    return load_weights(build, folder, vae_conv.param_table(raw), config_path, dtype, mesh, rules)


def clip_state_dict(model: CLIPText) -> dict[str, np.ndarray]:
    """The transformers state dict of `model` (keys as transformers 5.x `save_pretrained` writes them)."""
    return to_torch_state(flat_params(model), clip_conv.param_table(model.config.to_transformers()))


def t5_state_dict(model: T5Encoder) -> dict[str, np.ndarray]:
    """The transformers `T5EncoderModel` state dict of `model` (the embedding once, as `shared.weight`)."""
    return to_torch_state(flat_params(model), t5_conv.param_table(model.config.to_transformers()))


def vae_state_dict(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The diffusers `AutoencoderKL` state dict of `model` (bit-exact, same dtype)."""
    return to_torch_state(flat_params(model), vae_conv.param_table(model.config.to_diffusers()))


def _save(tensors: Mapping[str, np.ndarray], config: dict, folder: str, name: str, max_shard_bytes: int | None):
    save_checkpoint(tensors, folder, name=name, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_clip(model: CLIPText, folder: str, *, max_shard_bytes: int | None = 5 * 2**30) -> None:
    """Write a folder that transformers' `CLIPTextModel[WithProjection].from_pretrained` loads."""
    _save(clip_state_dict(model), model.config.to_transformers(), folder, "model", max_shard_bytes)


def save_t5(model: T5Encoder, folder: str, *, max_shard_bytes: int | None = 5 * 2**30) -> None:
    """Write a folder that transformers' `T5EncoderModel.from_pretrained` loads."""
    _save(t5_state_dict(model), model.config.to_transformers(), folder, "model", max_shard_bytes)


def save_vae(model: AutoencoderKL, folder: str, *, max_shard_bytes: int | None = 10 * 2**30) -> None:
    """Write a diffusers `vae/` folder that `AutoencoderKL.from_pretrained` loads."""
    _save(vae_state_dict(model), model.config.to_diffusers(), folder, "diffusion_pytorch_model", max_shard_bytes)
