"""Config dataclasses from plain dicts (JSON, presets, saved model folders)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def config_from_dict(cls: type, values: dict[str, Any]):
    """Build a frozen config dataclass; unknown keys are errors, lists become tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} settings {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        clean[key] = value
    return cls(**clean)
