"""The paper's ablation search spaces, as data.

A space names only what its trials *change*: each entry is a swept training setting and its values,
and ``space_for`` turns them into a Ray Tune ``param_space`` (``{"grid_search": [...]}`` per swept
setting, plus the seed grid). Everything a space does not sweep is the preset's own DiT setting
(``pipeline/sweep.py`` builds each trial from the preset's settings with only the swept ones
replaced), so a space cannot make a GPU preset's sweep train another model than the preset's.

Parameter names are the DiT training config's field names (``workers.train_dit.TrainDiTConfig``;
the sweep driver refuses, before any trial starts, a swept name the config lacks), except
``variant``, a named bundle of settings (``VARIANTS``):

    horizon         generated frames T (the paper's "generation length"); swept, each trial trains
                    that one length, else a trial trains the preset's lengths and is scored at each
    action_mode     "future" (a_t..a_{t+T-1}) | "past_future" (a_{t-n+1}..a_{t+T-1})
    action_encoder  "embedding" | "onehot"
    variant         a key of ``VARIANTS``: its action_mode and action_encoder together
    game            ALE game name as in ``ALE/<game>-v5``
    seed            training seed; tables report mean and spread over seeds
    dit_preset      key of ``models.stdit.STDiT_models``
    sample_steps    Euler steps at evaluation

Usage::

    from tune_spaces import space_for
    param_space = space_for("ablations", seeds=(0, 1, 2))
    param_space = space_for("table3", seeds=(0,), overrides={"horizon": [1, 2], "game": "Breakout"})
"""

from collections.abc import Iterable, Mapping
from typing import Any

GAMES = ("Breakout", "Pong", "DemonAttack")
HORIZONS = (1, 2, 4)
# The values the models accept (`models.action_encoder.ACTION_MODES` and `ENCODER_KINDS`), written
# again here because importing that module loads torch, and these spaces are data that load nothing;
# tests/test_tune_spaces.py checks that both stay the same and that importing tune_spaces loads no torch.
ACTION_MODES = ("future", "past_future")
ACTION_ENCODERS = ("embedding", "onehot")
# Named STDiT presets, smallest to largest. `tiny` runs on CPU; `S`/`B` need a GPU at paper scale.
DIT_PRESETS = ("tiny", "S", "B")
# Rectified flow is near-straight, so quality should saturate after few Euler steps; doubling
# steps makes the saturation point visible on a log axis.
SAMPLE_STEPS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = (0, 1, 2)

# The paper's main configuration (Table 2), the reference of both action ablations.
REFERENCE = {"action_mode": "future", "action_encoder": "embedding"}
# The settings of Tables 3 and 4 in one grid: the reference, Table 3's past + future actions, and
# Table 4's one-hot encoder; each differs from the reference in one setting, so one set of
# reference trials serves both tables.
VARIANTS: dict[str, dict[str, str]] = {
    "future+embedding": dict(REFERENCE),
    "past_future+embedding": {"action_mode": "past_future", "action_encoder": "embedding"},
    "future+onehot": {"action_mode": "future", "action_encoder": "onehot"},
}
BUNDLES: dict[str, dict[str, dict[str, Any]]] = {"variant": VARIANTS}
"""Parameters whose value names several settings at once: {parameter: {value: {field: value}}}."""

# name -> {parameter: values swept}. Nothing else: what a space does not sweep is the preset's.
SWEEPS: dict[str, dict[str, tuple]] = {
    "table2": {"game": GAMES, "horizon": HORIZONS},
    "table3": {"action_mode": ACTION_MODES, "horizon": HORIZONS},
    "table4": {"action_encoder": ACTION_ENCODERS, "horizon": HORIZONS},
    "ablations": {"variant": tuple(VARIANTS)},
    "model_size": {"dit_preset": DIT_PRESETS},
    "sampling_steps": {"sample_steps": SAMPLE_STEPS},
}

CHOICES: dict[str, tuple] = {"action_mode": ACTION_MODES, "action_encoder": ACTION_ENCODERS,
                             "variant": tuple(VARIANTS)}
"""Parameters with a closed set of values: anything else is refused, naming the parameter."""
_POSITIVE_INTS = ("horizon", "sample_steps")


def _check_value(name: str, key: str, value: Any) -> None:
    """Reject a value the trial would reject (or silently misread), here, naming the space and key."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"space {name!r}: {key}={value!r} is not one of {list(CHOICES[key])}")
    if key in _POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"space {name!r}: {key}={value!r} must be a positive int")
    if key == "seed" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"space {name!r}: seed={value!r} must be a non-negative int")
    if key in ("game", "dit_preset") and (not isinstance(value, str) or not value):
        raise ValueError(f"space {name!r}: {key}={value!r} must be a non-empty string")


def grid(values: Iterable[Any]) -> dict[str, list]:
    """Ray Tune's grid form (what ``ray.tune.grid_search`` returns), without importing Ray."""
    return {"grid_search": list(values)}


def is_grid(entry: Any) -> bool:
    return isinstance(entry, dict) and set(entry) == {"grid_search"}


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
        return grid(values)
    _check_value(name, key, value)
    return value


def space_for(
    name: str,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh param_space for the ablation `name` (one of ``SWEEPS``): its swept parameters, and
    ``seed`` as a grid over `seeds`.

    `overrides` replaces or adds entries: a list/tuple sweeps those values (``{"horizon": [1]}``
    narrows a swept axis, ``{"horizon": [1, 2, 4]}`` adds one), a scalar fixes one value
    (``{"game": "Pong"}``). Whether a key is a training setting is the sweep driver's check; here,
    an unknown space name, a seed among the overrides, a parameter that a bundle already sets, and
    invalid values raise ``KeyError``/``ValueError``.
    """
    if name not in SWEEPS:
        raise KeyError(f"unknown search space {name!r}; known: {sorted(SWEEPS)}")
    overrides = dict(overrides or {})
    if "seed" in overrides:
        raise KeyError(f"space {name!r}: give seeds as `seeds`, not as an override")
    raw: dict[str, Any] = {**SWEEPS[name], **overrides}
    for bundle, members in BUNDLES.items():
        if bundle in raw:
            fields = {f for settings in members.values() for f in settings}
            clash = sorted(fields & set(raw))
            if clash:
                raise KeyError(f"space {name!r}: {clash} set both directly and by {bundle!r} "
                               f"(whose values set {sorted(fields)})")
    space = {key: _entry(name, key, value) for key, value in raw.items()}
    space["seed"] = _entry(name, "seed", tuple(seeds))
    return space


def swept(space: Mapping[str, Any]) -> tuple[str, ...]:
    """The parameters a space sweeps (a grid, even of one value), in the space's order, seed excepted."""
    return tuple(k for k, v in space.items() if is_grid(v) and k != "seed")


def expand_bundles(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters with every bundle (``variant``) replaced by the settings it names."""
    out = {}
    for key, value in params.items():
        if key in BUNDLES:
            out.update(BUNDLES[key][value])
        else:
            out[key] = value
    return out


# The default spaces, built once for inspection (`SPACES["table2"]["horizon"]`). Callers that edit
# a space should take a copy from `space_for`.
SPACES: dict[str, dict[str, Any]] = {name: space_for(name) for name in SWEEPS}
