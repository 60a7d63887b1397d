"""The paper's ablation search spaces, as data.

Each space is a plain dict ``{parameter: value}`` that goes straight into a Ray Tune
``param_space``. A swept parameter is a ``tune.grid_search([...])``; a parameter the ablation holds
fixed is a plain value, so every space says in full which setting each of its trials trains (the
paper's Tables 3 and 4 are Breakout only, with the Table 2 settings elsewhere).

Parameter names are the DiT training config's field names, so a trial's resolved config can be
passed as ``Config(**config)`` and an unknown key fails there, loudly:

    horizon         generated frames T (the paper's "generation length")
    action_mode     "future" (a_t..a_{t+T-1}) | "past_future" (a_{t-n+1}..a_{t+T-1})
    action_encoder  "embedding" | "onehot"
    game            ALE game name as in ``ALE/<game>-v5``
    seed            training seed; tables report mean ± std over seeds
    dit_preset      key of ``models.stdit.STDiT_models``
    sample_steps    Euler steps at evaluation

Usage::

    from tune_spaces import space_for
    param_space = space_for("table3", seeds=(0, 1, 2), overrides={"horizon": [1, 4]})
"""

from collections.abc import Iterable, Mapping
from typing import Any

from ray import tune

GAMES = ("Breakout", "Pong", "DemonAttack")
HORIZONS = (1, 2, 4)
ACTION_MODES = ("future", "past_future")
ACTION_ENCODERS = ("embedding", "onehot")
# Named STDiT presets, smallest to largest; the model-size sweep trains each at the Table 2
# defaults. `tiny` runs on CPU; `S`/`B` need a GPU at paper scale.
DIT_PRESETS = ("tiny", "S", "B")
# Rectified flow is near-straight, so quality should saturate after few Euler steps; doubling
# steps makes the saturation point visible on a log axis.
SAMPLE_STEPS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = (0, 1, 2)

# The settings every ablation holds fixed unless it sweeps them: the paper's main configuration
# (Table 2: future actions only, learned embedding, Breakout for the single-game tables).
DEFAULTS: dict[str, Any] = {
    "game": "Breakout",
    "horizon": 4,
    "action_mode": "future",
    "action_encoder": "embedding",
    "dit_preset": "tiny",
    "sample_steps": 8,
}

PARAMS = ("game", "horizon", "action_mode", "action_encoder", "seed", "dit_preset", "sample_steps")

# name -> {parameter: values swept}; everything else comes from DEFAULTS, plus the seed grid.
_SWEEPS: dict[str, dict[str, tuple]] = {
    "table2": {"game": GAMES, "horizon": HORIZONS},
    "table3": {"action_mode": ACTION_MODES, "horizon": HORIZONS},
    "table4": {"action_encoder": ACTION_ENCODERS, "horizon": HORIZONS},
    "model_size": {"dit_preset": DIT_PRESETS},
    "sampling_steps": {"sample_steps": SAMPLE_STEPS},
}

_CHOICES: dict[str, tuple] = {"action_mode": ACTION_MODES, "action_encoder": ACTION_ENCODERS}
_POSITIVE_INTS = ("horizon", "sample_steps")


def _check_value(name: str, key: str, value: Any) -> None:
    """Reject a value the DiT config would reject anyway, but here, naming the space and key."""
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ValueError(f"space {name!r}: {key}={value!r} is not one of {list(_CHOICES[key])}")
    if key in _POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"space {name!r}: {key}={value!r} must be a positive int")
    if key == "seed" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"space {name!r}: seed={value!r} must be a non-negative int")
    if key in ("game", "dit_preset") and (not isinstance(value, str) or not value):
        raise ValueError(f"space {name!r}: {key}={value!r} must be a non-empty string")


def _entry(name: str, key: str, value: Any) -> Any:
    """A list/tuple becomes a grid over its values; anything else is a fixed value."""
    if isinstance(value, (list, tuple)):
        values = list(value)
        if not values:
            raise ValueError(f"space {name!r}: {key} has an empty list of values")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"space {name!r}: {key} repeats a value in {values}")
        for v in values:
            _check_value(name, key, v)
        return tune.grid_search(values)
    _check_value(name, key, value)
    return value


def space_for(
    name: str,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh param_space for the ablation `name` (one of ``SPACES``).

    `seeds` becomes a grid over ``seed``. `overrides` replaces entries: a list/tuple sweeps those
    values, a scalar fixes one (e.g. ``{"horizon": [1]}`` for a quick run, ``{"game": "Pong"}``).
    Unknown names, unknown keys and invalid values raise ``KeyError``/``ValueError``.
    """
    if name not in _SWEEPS:
        raise KeyError(f"unknown search space {name!r}; known: {sorted(_SWEEPS)}")
    unknown = sorted(set(overrides or {}) - set(PARAMS))
    if unknown:
        raise KeyError(f"space {name!r}: unknown override key(s) {unknown}; known: {list(PARAMS)}")
    raw: dict[str, Any] = {**DEFAULTS, **_SWEEPS[name], "seed": tuple(seeds), **(overrides or {})}
    return {key: _entry(name, key, raw[key]) for key in PARAMS}


# The default spaces, built once for inspection (`SPACES["table2"]["horizon"]`). Tune mutates
# nothing in them, but callers that edit a space should take a copy from `space_for`.
SPACES: dict[str, dict[str, Any]] = {name: space_for(name) for name in _SWEEPS}
