"""The ablation spaces expand, through Ray Tune's own variant generator, into the paper's grids."""

import pytest
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from tune_spaces import DEFAULTS, PARAMS, SPACES, space_for


def expand(space: dict) -> list[dict]:
    """Resolved trial configs, exactly as Tune's grid expansion produces them."""
    return [config for _, config in generate_variants(space)]


def values(configs: list[dict], key: str) -> set:
    return {c[key] for c in configs}


# name -> (trials with 3 seeds, {swept key: expected values})
EXPECTED = {
    "table2": (3 * 3 * 3, {"game": {"Breakout", "Pong", "DemonAttack"}, "horizon": {1, 2, 4}}),
    "table3": (2 * 3 * 3, {"action_mode": {"future", "past_future"}, "horizon": {1, 2, 4}}),
    "table4": (2 * 3 * 3, {"action_encoder": {"embedding", "onehot"}, "horizon": {1, 2, 4}}),
    "model_size": (3 * 3, {"dit_preset": {"tiny", "S", "B"}}),
    "sampling_steps": (6 * 3, {"sample_steps": {1, 2, 4, 8, 16, 32}}),
}


def test_every_named_space_is_tested():
    assert set(SPACES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_space_expands_to_the_full_grid(name):
    n_trials, swept = EXPECTED[name]
    configs = expand(space_for(name, seeds=(0, 1, 2)))
    assert len(configs) == n_trials
    # Every trial names every training-config field, and no two trials are the same config.
    assert all(set(c) == set(PARAMS) for c in configs)
    assert len({tuple(sorted(c.items())) for c in configs}) == n_trials
    assert values(configs, "seed") == {0, 1, 2}
    for key, expected in swept.items():
        assert values(configs, key) == expected, key
    # Whatever a table does not sweep stays at the paper's main setting.
    for key in set(PARAMS) - set(swept) - {"seed"}:
        assert values(configs, key) == {DEFAULTS[key]}, key


def test_single_game_tables_are_breakout_with_future_embedding():
    # Tables 3 and 4 of the paper are Breakout only; each holds the other ablation's axis fixed.
    t3 = expand(space_for("table3"))
    t4 = expand(space_for("table4"))
    assert values(t3, "game") == values(t4, "game") == {"Breakout"}
    assert values(t3, "action_encoder") == {"embedding"}
    assert values(t4, "action_mode") == {"future"}
    assert values(expand(space_for("table2")), "action_mode") == {"future"}


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
    assert len(trials) == 6
    assert {(c["action_encoder"], c["horizon"]) for c in trials} == {
        (e, h) for e in ("embedding", "onehot") for h in (1, 2, 4)
    }
    assert values(trials, "seed") == {7}


def test_seeds_and_overrides():
    configs = expand(space_for("table2", seeds=[5], overrides={"horizon": [1], "game": "Pong"}))
    assert [(c["game"], c["horizon"], c["seed"]) for c in configs] == [("Pong", 1, 5)]
    configs = expand(space_for("model_size", seeds=range(4), overrides={"dit_preset": ["B"]}))
    assert len(configs) == 4 and values(configs, "dit_preset") == {"B"}


def test_space_for_returns_independent_copies():
    a = space_for("table2")
    a["horizon"] = 99
    assert space_for("table2")["horizon"] == SPACES["table2"]["horizon"]
    assert SPACES["table2"]["horizon"] != 99


def test_unknown_space_name_is_rejected_with_the_known_names():
    with pytest.raises(KeyError, match=r"unknown search space 'table9'.*table2"):
        space_for("table9")


def test_unknown_override_key_is_rejected():
    with pytest.raises(KeyError, match=r"unknown override key\(s\) \['horizn'\]"):
        space_for("table2", overrides={"horizn": [1]})


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


def test_invalid_seed_is_rejected():
    with pytest.raises(ValueError, match=r"seed=-1 must be a non-negative int"):
        space_for("table2", seeds=(0, -1))
