"""Model config dataclasses whose fields come from `conversion/`'s schemas.

Each model family's config schema (field names, defaults, validation) is written once, as `DEFAULTS` and
`normalize_config` in its `conversion/` module (which must stay free of flowsteer_jax imports: the torch-free
exporter uses it). `schema_dataclass(DEFAULTS)` turns the class body below it (methods, properties) into a
frozen dataclass with exactly those fields, in that order, with those defaults, so the model side holds no copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


def schema_dataclass(defaults: Mapping[str, Any], **extra: Any) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass with one field per `defaults` entry (then `extra`'s), same defaults.

    The class body keeps its methods, properties and docstring; it must not declare fields of its own.
    """
    fields = {**defaults, **extra}

    def wrap(cls: type) -> type:
        own = [k for k in vars(cls).get("__annotations__", {}) if not k.startswith("_")]
        if own:
            raise TypeError(f"{cls.__name__}: declares fields {own}; they come from the schema's defaults")
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        specs = [(name, Any, dataclasses.field(default=value)) for name, value in fields.items()]
        # `namespace` carries `__module__`/`__qualname__` too, so the result pickles and prints as `cls` would.
        return dataclasses.make_dataclass(cls.__name__, specs, namespace=namespace, frozen=True)

    return wrap
