"""JSON round trips of the model config dataclasses."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict, tuple_fields: tuple[str, ...]) -> T:
    """`cls(**values)`, rejecting unknown keys and turning JSON lists back into tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; known are {sorted(fields)}.")
    values = dict(values)
    for name in tuple_fields:
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return cls(**values)
