"""Which SAE config fields may differ between the members of one stack.

A field marked `per_member()` (a coefficient, a dead-latent window, an initial value) may
differ inside a stack; every other field defines the stack's shape and computation, so
members must agree on it. Sections (an architecture's options) are searched too.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def per_member() -> dict:
    """Field metadata: the field may differ between the members of one stack."""
    return {"per_member": True}


def stack_key(cfg: T) -> T:
    """The config with per-member fields reset to their defaults (in its sections too):
    configs with equal keys can share a stack."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("per_member"):
            changes[f.name] = f.default
        elif dataclasses.is_dataclass(value):
            changes[f.name] = stack_key(value)
    return dataclasses.replace(cfg, **changes)


def per_member_fields(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the fields of `cls` (and of its sections) marked per_member()."""
    names: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("per_member"):
            names.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            names += per_member_fields(hints[f.name], f"{prefix}{f.name}.")
    return tuple(names)
