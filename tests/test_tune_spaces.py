"""The ablation spaces hold only what they sweep, in values the models accept, and expand through Ray
Tune's own variant generator into the trials they say. (What each trial trains, the preset's settings
with only the swept ones changed, is tests/test_ablations.py.)"""

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from tune_spaces import BUNDLES, CHOICES, REFERENCE, SPACES, SWEEPS, VARIANTS, expand_bundles, space_for, swept

ROOT = Path(__file__).resolve().parents[1]


def expand(space: dict) -> list[dict]:
    """Resolved trial configs, exactly as Tune's grid expansion produces them."""
    return [config for _, config in generate_variants(space)]


def values(configs: list[dict], key: str) -> set:
    return {c[key] for c in configs}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_a_space_holds_only_swept_settings_and_the_seed_grid(name):
    # No fixed value may ride along: a fixed value in a space would replace the preset's setting.
    space = space_for(name, seeds=(0, 1))
    assert all(set(entry) == {"grid_search"} for entry in space.values()), space
    assert set(swept(space)) | {"seed"} == set(space)
    configs = expand(space)
    assert all(set(c) == set(space) for c in configs)  # a trial carries nothing but its grid point
    sizes = [len(space[k]["grid_search"]) for k in space]
    assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) == math.prod(sizes)


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_every_swept_setting_is_a_dit_training_field_with_accepted_values(name):
    from models.action_encoder import ACTION_MODES, ENCODER_KINDS
    from models.stdit import STDiT_models
    from workers.train_dit import TrainDiTConfig

    fields = {f.name for f in dataclasses.fields(TrainDiTConfig)}
    for key in swept(SPACES[name]):
        members = {f for s in BUNDLES[key].values() for f in s} if key in BUNDLES else {key}
        assert members <= fields, (name, key)
    accepted = {"action_mode": set(ACTION_MODES), "action_encoder": set(ENCODER_KINDS), "dit_preset": set(STDiT_models)}
    for config in expand(space_for(name, seeds=(0,))):
        settings = expand_bundles(config)
        for key, ok in accepted.items():
            if key in settings:
                assert settings[key] in ok, (name, key, settings[key])
        # every grid point builds a valid training config (horizon_choices are the sweep's to set)
        TrainDiTConfig(**{k: v for k, v in settings.items() if k != "game"})


def test_the_choices_are_every_setting_the_models_accept():
    """tune_spaces keeps its own copy of the models' action modes and encoders (importing
    models.action_encoder would load torch): the same values, in the same order."""
    from models.action_encoder import ACTION_MODES, ENCODER_KINDS

    assert CHOICES["action_mode"] == ACTION_MODES
    assert CHOICES["action_encoder"] == ENCODER_KINDS


def test_importing_the_spaces_loads_no_torch():
    """Why the copy above exists: the spaces are data, importable without torch or the models."""
    code = "import sys, tune_spaces; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'models'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_variants_are_the_reference_and_one_change_each_for_tables_3_and_4():
    changes = {name: {k for k, v in s.items() if REFERENCE[k] != v} for name, s in VARIANTS.items()}
    assert sorted(map(len, changes.values())) == [0, 1, 1]  # the reference, and one setting changed apiece
    changed = {(k, VARIANTS[n][k]) for n, c in changes.items() for k in c}
    assert changed == {("action_mode", "past_future"), ("action_encoder", "onehot")}
    assert all(set(s) == set(REFERENCE) for s in VARIANTS.values())


def test_ablations_space_expands_to_three_variants_per_seed():
    configs = expand(space_for("ablations", seeds=(0, 1, 2)))
    got = {(expand_bundles(c)["action_mode"], expand_bundles(c)["action_encoder"], c["seed"]) for c in configs}
    assert got == {(m, e, s) for (m, e), s in itertools.product(
        [("future", "embedding"), ("past_future", "embedding"), ("future", "onehot")], (0, 1, 2))}
    assert len(configs) == 9


def _noop_trainable(config: dict) -> None:
    """Only for Trial objects: the generator needs something to name as the trainable."""


def test_basic_variant_generator_yields_the_same_trials():
    # The search algorithm a Tuner uses for grid spaces, so this is what a sweep would run.
    space = space_for("table4", seeds=(7,))
    gen = BasicVariantGenerator()
    gen.add_configurations({"table4": {"run": _noop_trainable, "config": space}})
    trials = []
    while (trial := gen.next_trial()) is not None:
        trials.append(trial.config)
    assert {(c["action_encoder"], c["horizon"], c["seed"]) for c in trials} == {
        (e, h, 7) for e in ("embedding", "onehot") for h in (1, 2, 4)}
    assert all(set(c) == {"action_encoder", "horizon", "seed"} for c in trials)


def test_overrides_narrow_extend_or_fix():
    configs = expand(space_for("table3", seeds=[5], overrides={"horizon": [1], "game": "Pong"}))
    assert [(c["action_mode"], c["horizon"], c["game"], c["seed"]) for c in configs] == [
        ("future", 1, "Pong", 5), ("past_future", 1, "Pong", 5)]
    space = space_for("ablations", seeds=(0,), overrides={"horizon": [1, 4]})  # an added axis
    assert swept(space) == ("variant", "horizon") and len(expand(space)) == 6
    assert space_for("ablations", overrides={"game": "Pong"})["game"] == "Pong"  # fixed: not swept
    assert "game" not in swept(space_for("ablations", overrides={"game": "Pong"}))


def test_space_for_returns_independent_copies():
    a = space_for("table2")
    a["horizon"]["grid_search"].append(99)
    assert 99 not in space_for("table2")["horizon"]["grid_search"]
    assert 99 not in SPACES["table2"]["horizon"]["grid_search"]


def test_unknown_space_name_is_rejected_with_the_known_names():
    with pytest.raises(KeyError, match=r"unknown search space 'table9'.*ablations"):
        space_for("table9")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"action_mode": ["future", "past"]}, r"action_mode='past' is not one of"),
        ({"action_encoder": "one-hot"}, r"action_encoder='one-hot' is not one of"),
        ({"horizon": [0, 1]}, r"horizon=0 must be a positive int"),
        ({"sample_steps": 2.5}, r"sample_steps=2.5 must be a positive int"),
        ({"horizon": []}, r"horizon has an empty list"),
        ({"horizon": [1, 1]}, r"horizon repeats a value"),
        ({"game": ""}, r"game='' must be a non-empty string"),
    ],
)
def test_invalid_values_are_rejected_naming_space_and_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        space_for("table3", overrides=overrides)


def test_bad_variants_seeds_and_bundle_clashes_are_rejected():
    with pytest.raises(ValueError, match=r"variant='past\+onehot' is not one of"):
        space_for("ablations", overrides={"variant": ["future+embedding", "past+onehot"]})
    with pytest.raises(ValueError, match=r"seed=-1 must be a non-negative int"):
        space_for("table2", seeds=(0, -1))
    with pytest.raises(KeyError, match="give seeds as `seeds`"):
        space_for("table2", overrides={"seed": [1]})
    # a variant names action_mode and action_encoder: setting one beside it would be ambiguous
    with pytest.raises(KeyError, match=r"\['action_mode'\] set both directly and by 'variant'"):
        space_for("ablations", overrides={"action_mode": ["future"]})
