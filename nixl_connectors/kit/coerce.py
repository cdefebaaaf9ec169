"""Typed coercion of settings mappings (JSON, engine extra-config dicts) into dataclasses (pure).

Types come from the dataclass's resolved annotations, never from their text: `bool` accepts
true/false (and the strings "true"/"false"/"1"/"0"/"yes"/"no"), `int` rejects floats with a
fraction and bools, enums take their value, `tuple[str, ...]` takes a list, `X | None` takes
None. Unknown keys are an error naming them; deprecated aliases map to their new name with a
warning (and an error when both are given).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import types
import typing
from typing import Any, Mapping, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


def _coerce(name: str, tp: Any, v: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, v)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors) or f"{name}: unsupported value {v!r}")
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(v).__name__}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_coerce(f"{name}[{i}]", inner, x) for i, x in enumerate(v)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(v, tp):
            return v
        try:
            return tp(v)
        except ValueError:
            raise ConfigError(f"{name}: {v!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise ConfigError(f"{name}: expected true or false, got {v!r}")
    if tp is int:
        if isinstance(v, bool):
            raise ConfigError(f"{name}: expected an integer, got {v!r}")
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {v!r}")
    if tp is float:
        if isinstance(v, bool):
            raise ConfigError(f"{name}: expected a number, got {v!r}")
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"{name}: expected a string, got {type(v).__name__}")
    if typing.get_origin(tp) is Mapping or tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(v, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {type(v).__name__}")
        return dict(v)
    raise ConfigError(f"{name}: unsupported setting type {tp!r}")


def coerce_mapping(cls: type[T], data: Mapping[str, Any] | None, *,
                   aliases: Mapping[str, str] | None = None,
                   ignore: frozenset[str] = frozenset(), what: str = "settings") -> dict[str, Any]:
    """Keyword arguments for `cls(**kw)` from `data`: keys checked, aliases resolved, values
    coerced to the annotated types. Keys in `ignore` are left out silently."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = dict(aliases or {})
    out: dict[str, Any] = {}
    unknown = []
    for key, value in dict(data or {}).items():
        if key in ignore:
            continue
        name = key
        if key in aliases:
            name = aliases[key]
            logger.warning("%s: %r is deprecated, use %r (the old name goes away in the next release)",
                           what, key, name)
            if name in (data or {}):
                raise ConfigError(f"{what}: both {key!r} and its new name {name!r} are given")
        if name not in known:
            unknown.append(key)
            continue
        out[name] = _coerce(name, hints[name], value)
    if unknown:
        raise ConfigError(f"unknown {what} {sorted(unknown)}; known: {sorted(known | set(aliases))}")
    return out
