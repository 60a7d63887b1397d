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
- `tiny_split_root` (session): that dataset relabelled so that each game has a train, a val and a
  test episode (a dataset root path; read-only).
- `tiny_trained` (session): a tiny VAE then DiT on Breakout of `tiny_split_root`, trained through
  the drivers (Ray Train, MLflow): `(run_dir, world_model_path, TrainDiTConfig)`. The one trained
  world model of a test session: share it, read-only.
- `job_cluster` (session): a Ray head started with `ray start --head` (token auth) and a real MLflow
  server, for tests that submit jobs with `ray job submit` (tests/cluster.py).

Every test that needs none of these fixtures and starts no job of its own (no subprocess of an
entry point, no Ray Serve, no browser) is marked `quick`: `python -m pytest -m quick tests` is the
few-minute loop while changing code; the whole suite is what CI runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Ray Train's controller looks at its workers every 2 s by default, so each training run of a test
# (dozens of them, most a few seconds long) ends or restarts after a crash up to 2 s late. Every
# Ray cluster of the session inherits this: ray.init's, `ray start`'s and the jobs'.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")


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


@pytest.fixture(scope="session")
def tiny_split_root(tiny_dataset, tmp_path_factory) -> str:
    """The tiny collected dataset with the split relabelled so that each game has a train, a val and
    a test episode: the collected one has two episodes per game whose hash split varies between sessions
    (episode ids carry worker pids), so a game may have no held-out episode at all."""
    import glob
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("resplit")
    seen: dict[str, int] = {}
    for f in sorted(glob.glob(os.path.join(tiny_dataset.root, "episodes", "**", "*.parquet"), recursive=True)):
        table = pq.read_table(f)
        rel = os.path.relpath(f, tiny_dataset.root)
        for eid in sorted(set(table["episode_id"].to_pylist())):
            game = table["game"][0].as_py()
            split = "train" if seen.get(game, 0) % 2 == 0 else "test"
            seen[game] = seen.get(game, 0) + 1
            part = table.filter(pa.compute.equal(table["episode_id"], eid))
            i = part.schema.get_field_index("split")
            # val holds a copy of each train episode under an id of its own (two episodes a game are
            # too few for three splits): never the test episode's frames, so reading test for val fails
            for name in (split, "val") if split == "train" else (split,):
                piece = part.set_column(i, "split", pa.array([name] * part.num_rows, part.schema.field("split").type))
                if name == "val":
                    j = piece.schema.get_field_index("episode_id")
                    piece = piece.set_column(j, "episode_id", pa.array([f"{eid}-val"] * piece.num_rows,
                                                                       piece.schema.field("episode_id").type))
                dst = out / (rel + f".{name}.parquet")
                dst.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(piece, dst, compression="zstd")
    assert all(n >= 2 for n in seen.values()), seen
    return str(out)


@pytest.fixture(scope="session")
def tiny_trained(tiny_split_root, tmp_path_factory):
    """VAE then DiT through the drivers: 2 Ray Train workers each, a few steps."""
    from pipeline.train import train_dit_main, train_vae_main
    from workers.train_dit import TrainDiTConfig
    from workers.train_vae import TrainVAEConfig

    run_dir = str(tmp_path_factory.mktemp("run"))
    common = dict(run_dir=run_dir, data_root=tiny_split_root, game="Breakout", steps=4, batch_size=2,
                  num_workers=2, cpus_per_worker=0.5, warmup_steps=1, log_every=1, checkpoint_every=2)
    vae_path = train_vae_main(TrainVAEConfig(**common, clip_length=4, clip_stride=8, val_every=2, val_windows=3))
    dit_cfg = TrainDiTConfig(**common, vae_path=str(vae_path), horizon=2, clip_stride=4, sample_steps=2,
                             snapshot_s=(0.0, 3600.0))
    return run_dir, train_dit_main(dit_cfg), dit_cfg


@pytest.fixture(scope="session")
def job_cluster(tmp_path_factory):
    """A Ray head started as users start one and an MLflow server, coming up in a background thread
    (tests/cluster.py: `JobCluster`); `head()` and `mlflow()` wait for them."""
    from cluster import JobCluster

    cluster = JobCluster(tmp_path_factory.mktemp("job_cluster"))
    yield cluster
    cluster.stop()


# Fixtures that start a Ray cluster, collect a dataset or train models; and modules whose tests start
# jobs, servers or browsers in subprocesses. A test touching neither is quick.
_SLOW_FIXTURES = frozenset({"ray_local", "tiny_dataset", "tiny_split_root", "tiny_trained", "job_cluster"})
_SLOW_MODULES = frozenset({"test_job", "test_readme", "test_cli", "test_serve", "test_learning", "test_benchmarks"})
_SLOW_TESTS = frozenset({"test_init_ray_starts_a_local_cluster_instead_of_joining_a_dead_one",  # Ray in a subprocess
                         "test_compose_mlflow_command_serves_clients_that_use_the_service_name"})  # an MLflow server


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: needs no Ray cluster, dataset, trained model or subprocess job "
                                       "(`pytest -m quick`; set by tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if (module not in _SLOW_MODULES and item.originalname not in _SLOW_TESTS
                and not _SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.quick)
