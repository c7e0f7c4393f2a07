"""LoRA adapters that keep the base model's parameter paths.

`apply_lora(model, rank=..., alpha=..., targets=...)` swaps every targeted `nnx.Linear` for a `LoRALinear`
that *takes over* the original `kernel`/`bias` Variables (same objects, same paths: `...attn.to_q.kernel`
is still what `conversion/` expects) and adds `lora_a (in, r)` / `lora_b (r, out)` of type `nnx.LoRAParam`,
so `nnx.split(model, nnx.LoRAParam, ...)` separates the adapters from the frozen base. `lora_b` starts at
zero: a fresh student is the teacher, bit for bit.

Teacher and student are the same module with a *static* switch: `set_lora_enabled(model, False)` makes
every `LoRALinear` skip its low-rank branch entirely (no `x @ A @ B` in the compiled graph), so inside a
jitted step `nnx.merge(graphdef, base, lora)` twice gives a teacher view and a student view of one copy of
the base weights.

Surgery, all over one path walker (`module_at` / `_replace`): `apply_lora` (fresh trainable adapters on the
targeted layers), `set_lora` (replace every adapter with given `(A, B)` pairs and one scale: how a trained LoRA is
loaded for inference) and `remove_lora` (each `LoRALinear` back to the plain `nnx.Linear` on the same Variables).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from conversion.safetensors_io import ConversionError
from flowsteer_jax.parallel import DEFAULT_RULES, MeshAxes, variable_sharding

ModulePath = tuple[str | int, ...]

# Attention projections (joint and, on SD3.5's dual-attention blocks, `attn2`) and both FFNs of every block.
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "net.0.proj",
    "net.2",
)
DEFAULT_SCOPE = r"transformer_blocks\.\d+\..*"


class LoRALinear(nnx.Linear):
    """`nnx.Linear` plus `scale * (x @ lora_a) @ lora_b`, `scale = alpha / rank`; built from an existing Linear."""

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        alpha: float,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        # Take over the base layer's Variables and settings: same objects, so no copy and unchanged paths.
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        in_axis, out_axis = (base.kernel.get_metadata().get("logical_axes") or (None, None))[-2:]
        d_in, d_out = base.kernel.shape
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
        bound = 1.0 / d_in**0.5
        a = jax.random.uniform(rngs.params(), (d_in, rank), param_dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=(in_axis, "lora_rank"))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), param_dtype), logical_axes=("lora_rank", out_axis))
        self.lora_rank, self.lora_scale = rank, float(alpha) / rank
        self.lora_enabled = True

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        if not self.lora_enabled:
            return y
        dt = y.dtype
        low = jnp.dot(inputs.astype(dt), self.lora_a[...].astype(dt), precision=self.precision)
        delta = jnp.dot(low, self.lora_b[...].astype(dt), precision=self.precision)
        return y + (self.lora_scale * delta).astype(dt)


# --- the path walker: a module path is a tuple (`("transformer_blocks", 0, "attn", "to_q")`) or its dotted form ---


def dotted(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def module_path(path: str | Sequence) -> ModulePath:
    """A dotted path (`"transformer_blocks.0.attn.to_q"`) or a path sequence -> the tuple, list indices as ints."""
    keys = path.split(".") if isinstance(path, str) else path
    return tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)


def _child(parent, key: str | int):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def module_at(model: nnx.Module, path: str | Sequence):
    """The submodule of `model` at `path` (AttributeError/IndexError where there is none)."""
    node = model
    for key in module_path(path):
        node = _child(node, key)
    return node


def _replace(model: nnx.Module, path: str | Sequence, module: nnx.Module) -> None:
    """Put `module` at `path` in `model`, in place."""
    *head, key = module_path(path)
    parent = module_at(model, head)
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def _matches(dotted_path: str, target: str) -> bool:
    return dotted_path == target or dotted_path.endswith("." + target)


def _in_scope(dotted_path: str, scope: str) -> bool:
    return re.fullmatch(scope, dotted_path) is not None


def unmatched_targets(linears: Iterable[str], targets: Sequence[str], scope: str = DEFAULT_SCOPE) -> list[str]:
    """The `targets` that end no dotted Linear path of `linears` under `scope`: `apply_lora`'s check, on names
    alone, so a run can make it from the transformer's config.json before loading it
    (`conversion.sd3_transformer.linear_modules`)."""
    names = [n for n in linears if _in_scope(n, scope)]
    return [t for t in targets if not any(_matches(n, t) for n in names)]


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    scope: str = DEFAULT_SCOPE,
    rngs: nnx.Rngs,
    param_dtype: jnp.dtype = jnp.float32,
) -> list[str]:
    """Replace, in place, each `nnx.Linear` whose dotted path matches `scope` and ends with a target.

    `targets` are dotted path suffixes (`"to_q"` matches `transformer_blocks.3.attn.to_q` and `...attn2.to_q`);
    `scope` is a regex the whole path must match. Returns the replaced paths; a target that matches nothing
    is an error (a typo would otherwise silently train nothing).
    """
    targets = tuple(targets)
    # LoRALinear (already adapted) and other modules are skipped
    linears = {dotted(path): (path, m) for path, m in nnx.iter_modules(model) if type(m) is nnx.Linear}
    missing = unmatched_targets(linears, targets, scope)
    if missing:
        raise ValueError(f"LoRA targets {missing} match no nnx.Linear under scope {scope!r}")
    found = [pm for name, pm in linears.items() if _in_scope(name, scope) and any(_matches(name, t) for t in targets)]
    for path, module in found:
        _replace(model, path, LoRALinear(module, rank=rank, alpha=alpha, rngs=rngs, param_dtype=param_dtype))
    return [dotted(p) for p, _ in found]


def plain_linear(layer: LoRALinear) -> nnx.Linear:
    """The `nnx.Linear` under a `LoRALinear`: same kernel/bias Variables (no copy), no adapter."""
    plain = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    for name, value in vars(layer).items():
        if not name.startswith("_") and not name.startswith("lora_"):
            setattr(plain, name, value)
    return plain


def remove_lora(model: nnx.Module) -> list[str]:
    """Turn every `LoRALinear` of `model` back into its plain `nnx.Linear` (same Variables), in place.

    Returns the dotted paths of the layers that had an adapter, sorted.
    """
    removed = [(path, layer) for path, layer in nnx.iter_modules(model) if isinstance(layer, LoRALinear)]
    for path, layer in removed:
        _replace(model, path, plain_linear(layer))
    return sorted(dotted(p) for p, _ in removed)


def set_lora(
    model: nnx.Module,
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    scale: float,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> list[str]:
    """Replace all adapters of `model`: drop every current one, then adapt each listed Linear with its `(A, B)`.

    `pairs`: dotted module path -> (`A (in, r)`, `B (r, out)`); each layer computes `x @ W + b + scale * x @ A @ B`
    (so its `lora_scale` is `scale`, whatever the rank). Every target is checked first, so a bad one raises a
    ConversionError and leaves the model untouched. With `mesh`, A and B are placed as `rules` shard them.
    Returns the adapted paths, sorted.
    """
    for path in pairs:  # check every target before changing anything
        try:
            ok = isinstance(module_at(model, path), nnx.Linear)
        except (AttributeError, IndexError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ConversionError(f"LoRA module {path!r} is not an nnx.Linear in this transformer")
    remove_lora(model)
    for path, (a, b) in pairs.items():
        rank = a.shape[1]
        layer = LoRALinear(module_at(model, path), rank=rank, alpha=rank, rngs=nnx.Rngs(0))
        for var, value in ((layer.lora_a, a), (layer.lora_b, b)):
            sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
            var.set_value(jax.device_put(np.asarray(value, np.float32), sharding))
        layer.lora_scale = float(scale)
        _replace(model, path, layer)
    return sorted(pairs)


def lora_layers(model: nnx.Module) -> list[LoRALinear]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def set_lora_enabled(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Switch every adapter of `model` on (student) or off (teacher); static, so 'off' compiles no LoRA ops."""
    for layer in lora_layers(model):
        layer.lora_enabled = bool(enabled)
    return model


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, lora, base)`: the adapters (`nnx.LoRAParam`, itself a `Param` subclass, so it goes first)."""
    return nnx.split(model, nnx.LoRAParam, ...)
