"""JSON values into typed dataclass fields: lists become tuples, ints become floats, and a value
of the wrong kind, a float that is not finite, a null where none is allowed or an unknown field
is a FieldError naming the field. The experiment config (ccnet_jax.config) and the model
configs' `from_dict` read JSON through it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class FieldError(ValueError):
    """A JSON value that does not fit a dataclass's fields; the message names the field."""


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """JSON value -> the field's type (lists to tuples, ints to floats), checking the kind."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args or annotation is Any:
            return None
        raise FieldError(f"{where} may not be null")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except FieldError as err:
                errors.append(str(err))
        raise FieldError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise FieldError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise FieldError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if not isinstance(value, bool):
            raise FieldError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # JSON readers take NaN, Infinity and 1e400; no setting means them
            raise FieldError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise FieldError(f"{where} must be a string, got {value!r}")
        return value
    return value


def dataclass_from_json(cls: type[T], values: dict[str, Any], where: str) -> T:
    """`cls` built from a JSON object of some of its fields (the others keep their defaults);
    `where` names the object in messages (e.g. "train" gives "train.steps ...")."""
    if not isinstance(values, dict):
        raise FieldError(f"section {where!r} must be a JSON object, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise FieldError(f"unknown field(s) {', '.join(where + '.' + u for u in unknown)}; "
                         f"{where} has: {', '.join(sorted(fields))}")
    return cls(**{key: coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()})
