"""Config dataclasses from plain dicts (JSON, presets, saved model folders)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def config_from_dict(cls: type, values: dict[str, Any]):
    """Build a frozen config dataclass; unknown keys are errors, lists become tuples. A dict-typed
    field gets a copy of the given dict, its values as given (a list stays a list, a tuple a tuple):
    whoever reads it resolves them, as `pipeline/sweep.py` resolves `SweepConfig.dit` through
    TrainDiTConfig, so that a list and a tuple of the same values give the same settings."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} settings {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        kind = typing.get_origin(hints[key]) or hints[key]
        if isinstance(value, list) and kind is tuple:
            value = tuple(value)
        elif isinstance(value, dict) and kind is dict:
            value = dict(value)  # the caller's dict may change later; the frozen config's must not
        clean[key] = value
    return cls(**clean)
