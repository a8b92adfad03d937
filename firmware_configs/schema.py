"""Strict dataclass <-> TOML table checking, shared by profiles and `--set` overrides.

Same rule as the device config (edge_runtime/config.py): an unknown key or a value of the
wrong type is an error naming the key, because a typo in a profile silently becomes a device
that runs with the wrong memory limit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from fleetlearn.firmware_configs.errors import FlashError


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(type, optional) for `T` or `T | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported annotation {annotation!r}")
        return args[0], True
    return annotation, False


def type_name(annotation: Any) -> str:
    base, _ = base_type(annotation)
    return {int: "an integer", bool: "true or false", str: "a string", float: "a number"}.get(base, "a table")


def check_value(annotation: Any, value: Any, name: str, error: type[FlashError] = FlashError) -> Any:
    """Return `value` if it fits `annotation` (int, bool, str, float or a dataclass table), else raise."""
    base, _ = base_type(annotation)
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        if not isinstance(value, Mapping):
            raise error(f"key {name!r} must be a table")
        return from_table(base, value, f"{name}.", error)
    if base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported field type {annotation!r} for {name}")
    if not ok:
        raise error(f"key {name!r} must be {type_name(annotation)}, got {type(value).__name__} {value!r}")
    return float(value) if base is float else value


def from_table(cls: type, doc: Mapping[str, Any], where: str = "", error: type[FlashError] = FlashError):
    """Build dataclass `cls` from a decoded TOML table, rejecting unknown keys, wrong types and missing keys."""
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in fields:
            raise error(f"unknown key {where + key!r} (known: {', '.join(sorted(fields))})")
        values[key] = check_value(hints[key], value, where + key, error)
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in values and not has_default:
            raise error(f"missing required key {where + name!r}")
    return cls(**values)


def to_table(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready dict: None values dropped (TOML has no null)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        out[f.name] = to_table(value) if dataclasses.is_dataclass(value) else value
    return out
