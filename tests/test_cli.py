"""Every entry point answers --help as a new user would call it, and collect's parser keeps its
agent's settings apart from its own (both have a `seed`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, expect", [
    (["pipeline/collect.py"], "--agent-seed"),
    (["pipeline/train.py", "vae"], "--val_every"),
    (["pipeline/train.py", "dit"], "--vae_path"),
    (["pipeline/evaluate.py"], "--split"),
    (["pipeline/sweep.py"], "--space"),
    (["pipeline/run_all.py"], "--seed"),
    (["pipeline/imagine.py"], "--eval_episodes"),
    (["-m", "benchmarks.bench_env"], "--random-model"),
    (["-m", "pipeline.results", "tables"], "--preset"),
])
def test_entry_point_help(argv, expect):
    res = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expect in res.stdout


def test_collect_parser_keeps_agent_and_collection_seeds_apart():
    from pipeline.collect import _parse

    cfg = _parse(["--seed", "3", "--agent-seed", "5", "--games", "Pong", "--val-fraction", "0.25",
                  "--agent-train-steps", "100"])
    assert (cfg.seed, cfg.agent.seed, cfg.games, cfg.val_fraction, cfg.agent.train_steps) == (3, 5, ("Pong",), 0.25, 100)
