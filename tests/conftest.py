"""Shared fixtures.

- `ray_local` (session): a local Ray cluster, `ray.init(num_cpus=2, include_dashboard=False)`,
  shut down at the end of the session. Request it in any test that uses Ray (Data, Train, RLlib).
  If Ray is already initialised (another fixture started it) that cluster is reused.
- `tiny_dataset` (session, needs `ray_local`): a real episode dataset collected once per session
  by `pipeline/collect.py` with the random policy: Pong and Breakout, ~300 recorded steps each,
  two RLlib env runners, half the episodes in the test split and none in val (two-split data, as
  collected before the val split existed). Returns a `TinyDataset` with
  `root` (dataset root: read it with `workers.clips.window_dataset(root, ...)` or
  `read_windows_numpy`) and `manifest` (the collection manifest dict). Treat it as read-only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": always a fresh cluster of our own, never one named by a stale
        # /tmp/ray/ray_current_cluster left behind by a killed cluster.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@dataclass(frozen=True)
class TinyDataset:
    root: str
    manifest: dict


@pytest.fixture(scope="session")
def tiny_dataset(ray_local, tmp_path_factory) -> TinyDataset:
    from pipeline.collect import CollectConfig, main

    root = str(tmp_path_factory.mktemp("tiny_dataset"))
    manifest = main(CollectConfig(data_root=root, run_id="tiny", games=("Pong", "Breakout"),
                                  policy="random", steps_per_game=300, steps_per_round=200,
                                  num_env_runners=2, test_fraction=0.5, val_fraction=0.0, seed=1))
    return TinyDataset(root=root, manifest=manifest)
