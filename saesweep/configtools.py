"""Build frozen config dataclasses from plain dicts (TOML files, sweep files) with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from saesweep.errors import UserError

T = TypeVar("T")


def closest(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest option, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def replace_from_dict(base: T, values: dict[str, Any], where: str) -> T:
    """`base` with the fields in `values` replaced, nested dicts merged into nested configs.

    Unknown keys and values of the wrong type raise UserError naming `where` and the key.
    """
    hints = typing.get_type_hints(type(base))
    changes = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: key {key!r} is not a string; config keys are field names")
        name = key.replace("-", "_")
        if name not in hints or name not in field_names(type(base)):
            raise UserError(f"{where}: unknown key {key!r}{closest(name, field_names(type(base)))}")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = replace_from_dict(current, value, f"{where}.{key}")
        else:
            changes[name] = coerce(value, hints[name], f"{where}: key {key!r}")
    return dataclasses.replace(base, **changes)


def parse_slice(spec: str) -> slice:
    """A Python slice written as text: ':-1', '-1:', '2:5', or one index '3'."""
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        return slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1)
    except (ValueError, TypeError):
        raise UserError(f"shards={spec!r} is not a Python slice such as ':-1' or '-1:'") from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the type `hint` (ints widen to floats, lists become tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(
            f"{where} has value {value!r}, expected one of {', '.join(map(repr, args))}"
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} has value {value!r}, expected a list")
        item = args[0] if args else Any
        return tuple(coerce(v, item, where) for v in value)
    if hint is Any:
        return value
    if hint is type(None) and value is None:
        return None
    if isinstance(value, bool) and hint is not bool:
        raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")
    if hint is float and isinstance(value, int | float):
        return float(value)
    if isinstance(hint, type) and hint is not type(None) and isinstance(value, hint):
        return value
    raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")
