"""Typed config sections: dataclasses with defaults, built from plain mappings (YAML).

:func:`build` checks every key of a mapping against a dataclass's fields and coerces each
value to the field's annotation (``int``, ``float``, ``bool``, ``str``, ``Literal``,
``list[...]``, ``dict``, optional unions, nested dataclasses), raising one one-line
:class:`~condnoise.errors.UserError` per bad key that names the key and the valid keys or
values. A nested dataclass with a ``from_dict(raw, *, origin, prefix)`` classmethod builds
itself (the model section dispatches on ``family``). The training config and the model
config use this one mechanism; ``dataclasses.asdict`` is the inverse (round trip).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal

from condnoise.errors import UserError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against / converted to the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(
                f"{where}: invalid value {value!r}; valid options: "
                + ", ".join(str(a) for a in args)
            )
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r}")  # programming error


def _dataclass_of(tp: Any) -> type | None:
    """``tp`` itself, or the dataclass in ``X | None``; None for other annotations."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0] if dataclasses.is_dataclass(args[0]) else None
    return None


def build(cls: type, raw: Any, origin: str, prefix: str = "", *, label: str | None = None) -> Any:
    """An instance of dataclass ``cls`` from mapping ``raw`` (``None`` = all defaults).

    ``prefix`` is the dotted path of the section (``"train."``) used in messages; ``label``
    names the section in the unknown-key message (default: the path).
    """
    label = label or prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: section '{prefix.rstrip('.') or 'top level'}' must be a "
                        f"mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"{origin}: unknown key '{prefix}{unknown[0]}'; valid keys in {label}: "
            + ", ".join(fields)
        )
    kwargs = {}
    for name, value in raw.items():
        tp, where = hints[name], f"{prefix}{name}"
        sub = _dataclass_of(tp)
        if sub is None:
            kwargs[name] = coerce(value, tp, f"{origin}: {where}")
        elif value is None and sub is not tp:
            kwargs[name] = None
        elif hasattr(sub, "from_dict"):
            kwargs[name] = sub.from_dict(value, origin=origin, prefix=f"{where}.")
        else:
            kwargs[name] = build(sub, value, origin, f"{where}.")
    return cls(**kwargs)
