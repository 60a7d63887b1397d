"""Training drivers: `train_vae_main(cfg)` then `train_dit_main(cfg)`, each one Ray Train run.

    python pipeline/train.py vae --run_dir /abs/runs/x --data_root /abs/data --steps 2000
    python pipeline/train.py dit --run_dir /abs/runs/x --data_root /abs/data --vae_path /abs/runs/x/models/vae

Layout of a run directory (`cfg.run_dir`, made absolute here, because Ray Train storage and
`ray job submit`'s temporary working directory both need absolute paths):

    <run_dir>/<name>/                  Ray Train storage of the run: checkpoints, resume state
    <run_dir>/<name>.metrics.jsonl     rank 0's metric lines (see workers/train_common.py)
    <run_dir>/<name>.latent_scale.json the DiT run's measured latent scale (reused on resume)
    <run_dir>/models/<name>/           exported EMA weights: the VAE, or the whole world model
    <run_dir>/mlflow.db, mlartifacts/  the default MLflow store (pipeline/tracking.py)

Metrics reach MLflow from the driver only: while `fit()` runs, a thread follows the JSONL and logs
each new line (so the MLflow UI shows live progress); lines written before this `fit()` were logged
by the driver that saw them. Restarting with the same `name` resumes from the last checkpoint (Ray
Train finds it in `<run_dir>/<name>/`) and continues the same MLflow run. A crashed worker group is
restarted from the last checkpoint up to `max_failures` times (FailureConfig). A loop that meets a
non-finite loss stops; the driver raises `NonFiniteLossError` naming the step and the last good
checkpoint, which stays in storage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Callable, Collection

# `python pipeline/<x>.py` puts pipeline/ on sys.path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402
from workers.train_common import (  # noqa: E402
    NONFINITE_EVENT, NonFiniteLossError, TrainSettings, metrics_path, pixels_to_model,
)
from workers.train_dit import TrainDiTConfig, build_dit, snapshot_name, snapshot_path  # noqa: E402
from workers.train_dit import train_loop_per_worker as dit_loop  # noqa: E402
from workers.train_vae import TrainVAEConfig, build_vae  # noqa: E402
from workers.train_vae import train_loop_per_worker as vae_loop  # noqa: E402
from workers.world_model import load_vae, save_vae, save_world_model, world_model_meta  # noqa: E402



# -- data ------------------------------------------------------------------------------------------
def clip_dataset(data_root: str, game: str, split: str, length: int, stride: int,
                 episodes: Collection[str] | None = None):
    """Ray Dataset of windows (`frames` uint8 (L, 210, 160, 3), `actions` int64 (L,)) of one split
    of one game (every game when `game` is empty); of the given episodes alone when `episodes` is
    set: their rows are kept before the shuffle that gathers episodes, so the others cost a read only."""
    from ray.data.expressions import col

    import pyarrow.parquet as pq
    import ray

    from workers.clips import parquet_files, window_dataset
    from workers.schema import EPISODE_ID, GAME

    files = parquet_files(data_root)
    if episodes is not None:
        # Only the files holding those episodes are read, and the episodes are picked after the
        # shuffle that gathers them: with an `is_in` filter before it, a 28-file collection failed
        # in Ray Data's hash shuffle ("Schema at index 1 was different": a block without columns
        # beside full ones), which a CPU-sized collection did not show.
        wanted = set(episodes)
        files = [f for f in files if wanted & set(pq.read_table(f, columns=[EPISODE_ID])[EPISODE_ID].to_pylist())]
        if not files:
            raise ValueError(f"none of the {len(wanted)} episodes asked for is in {data_root}")
    rows = ray.data.read_parquet(files, partitioning=None)  # as workers.clips.read_episodes
    if game:
        rows = rows.filter(expr=col(GAME) == game)
    # One shuffle partition per file, as window_dataset does for a path: Ray's default of 200
    # partitions costs minutes of scheduling on a small machine.
    partitions = max(1, min(200, len(files)))
    return window_dataset(rows, length=length, stride=stride, split=split, num_partitions=partitions,
                          episodes=episodes)


def spread_window_dataset(data_root: str, game: str, split: str, length: int, stride: int, n: int | None,
                          keys: set[tuple[str, int]] | None = None):
    """`n` windows of a split (`clip_dataset`), spread evenly over its windows in (episode, start)
    order so that every episode weighs in (all of them when n is None); or exactly the windows
    `keys` ((episode_id, start_step) pairs) when given. Chosen from the small columns alone; only
    the chosen windows' episodes are cut into windows (32 spread windows of Breakout's 361 training
    episodes touch at most 32 of them)."""
    from workers.clips import spread_indices, window_keys_of_split
    from workers.schema import EPISODE_ID

    if keys is None:
        every = window_keys_of_split(data_root, length, stride, split=split, game=game)
        keys = {every[i] for i in spread_indices(len(every), n)}
    chosen = frozenset(keys)
    ds = clip_dataset(data_root, game, split, length, stride, episodes={e for e, _ in chosen} or None)
    return ds.filter(lambda row: (str(row[EPISODE_ID]), int(row["start_step"])) in chosen), len(chosen)


def frame_dataset(data_root: str, game: str, split: str):
    """Ray Dataset of the rows (frames, actions, episode and step) of one split of one game (every
    game when `game` is empty): what the "device" loader reads into each worker's memory."""
    from ray.data.expressions import col

    from workers.clips import read_episodes
    from workers.frame_store import STORE_COLUMNS
    from workers.schema import GAME, SPLIT

    ds = read_episodes(data_root, columns=[*STORE_COLUMNS, GAME, SPLIT])
    ds = ds.filter(expr=col(SPLIT) == split)
    if game:
        ds = ds.filter(expr=col(GAME) == game)
    return ds.select_columns(STORE_COLUMNS)


def training_data_input(data_root: str, game: str, episode_share: float = 1.0) -> dict[str, Any]:
    """The training rows of a job (the train split of `game`, every game when empty, and the
    `episode_share` of its episodes) described for `Tracker.log_dataset`: the Parquet root as the
    source, the columns' Arrow types, a digest of the files (names, sizes) and the selection, and
    a profile of counts. Reads the small columns only."""
    import hashlib

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from workers import schema as S
    from workers.clips import episode_share_mask, parquet_files

    root = Path(data_root).expanduser().resolve()
    files = parquet_files(str(root))
    h = hashlib.sha256(json.dumps({"game": game, "split": "train", "share": episode_share}).encode())
    rows, episodes, schema = 0, set(), None
    for f in files:
        h.update(f"{os.path.relpath(f, root)}:{os.path.getsize(f)};".encode())
        t = pq.read_table(f, columns=[S.GAME, S.EPISODE_ID, S.SPLIT], partitioning=None)
        keep = pc.equal(t[S.SPLIT], "train")
        if game:
            keep = pc.and_(keep, pc.equal(t[S.GAME], game))
        t = t.filter(keep)
        if episode_share < 1.0 and t.num_rows:
            t = t.filter(episode_share_mask(t[S.EPISODE_ID], episode_share))
        rows += t.num_rows
        episodes.update(pc.unique(t[S.EPISODE_ID]).to_pylist())  # an episode may span files
        schema = schema or pq.read_schema(f)
    return {"source": str(root), "name": f"{root.name}/{game or 'all-games'}/train",
            "digest": h.hexdigest()[:16],
            "schema": {c: str(schema.field(c).type) for c in S.COLUMNS if c in schema.names},
            "profile": {"rows": rows, "episodes": len(episodes), "files": len(files), "game": game or "all",
                        "split": "train", "episode_share": episode_share, "frame_shape": list(S.FRAME_SHAPE)}}


def training_dataset(cfg, length: int, stride: int):
    """What the job's workers read: rows for the "device" loader, windows for "stream"; of the
    `train_episodes` share of the training episodes."""
    from workers.clips import keep_episode_share

    if cfg.data_loader == "device":
        return keep_episode_share(frame_dataset(cfg.data_root, cfg.game, "train"), cfg.train_episodes)
    ds = keep_episode_share(clip_dataset(cfg.data_root, cfg.game, "train", length, stride), cfg.train_episodes)
    return ds.select_columns(["frames", "actions"])  # tensors only: iter_torch_batches rejects strings


# -- running a TorchTrainer -------------------------------------------------------------------------
class MetricsFollower(threading.Thread):
    """Logs the lines appended to a metric JSONL to MLflow while training runs."""

    def __init__(self, path: Path, tracker: Tracker, poll_s: float = 2.0):
        super().__init__(daemon=True)
        self.path, self.tracker, self.poll_s = path, tracker, poll_s
        self.offset = path.stat().st_size if path.exists() else 0
        self.events: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def drain(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind("\n") + 1  # a line still being written waits for the next poll
        self.offset += len(chunk[:end].encode())
        rows = []
        for line in chunk[:end].splitlines():
            rec = json.loads(line)
            (self.events if "event" in rec else rows).append(rec)
        if rows:
            self.tracker.log_metric_rows(rows)

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            self.drain()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.drain()


def fit(loop: Callable[[dict], None], cfg: TrainSettings, dataset, tracker: Tracker,
        side_datasets: dict[str, Any] | None = None):
    """Build and fit the TorchTrainer of one job; returns its Result (checkpoint = last good one).
    `side_datasets` (the VAE job's "val" held-out windows and "select" training windows) reach
    every worker whole; the training one is split over them."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": dataset, **(side_datasets or {})},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            storage_path=cfg.run_dir, name=cfg.name,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
    )
    follower = MetricsFollower(metrics_path(cfg.run_dir, cfg.name), tracker)
    follower.start()
    try:
        result = trainer.fit()
    finally:
        follower.stop()
    bad = [e for e in follower.events if e["event"] == NONFINITE_EVENT]
    if bad:
        where = result.checkpoint.path if result.checkpoint else "none (no checkpoint was reported yet)"
        tracker.set_tags({"train/stopped": bad[0]["message"]})
        raise NonFiniteLossError(f"{cfg.name}: {bad[0]['message']}. Last good checkpoint: {where}")
    if result.checkpoint is None:
        raise RuntimeError(f"{cfg.name}: training reported no checkpoint (steps={cfg.steps})")
    return result


def _load_state(result) -> dict[str, Any]:
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)


def _absolute(cfg):
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().resolve()))


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        init_ray()  # a local cluster, or the one RAY_ADDRESS / `ray job submit` points at


# -- the two jobs ----------------------------------------------------------------------------------
def train_vae_main(cfg: TrainVAEConfig, tracking_uri: str | None = None) -> Path:
    """Train the VAE; returns the directory of its exported EMA weights (for TrainDiTConfig.vae_path)."""
    cfg = _absolute(cfg)
    _ensure_ray()
    build_vae(cfg)  # a bad preset fails here, before any worker starts
    ds = training_dataset(cfg, cfg.clip_length, cfg.clip_stride)
    side = {}  # the loop's checks: held-out windows, and the training windows export_best scores
    if cfg.val_every > 0:
        # The held-out check reads the val split (test is read by a run's final evaluation only).
        for name, split in (("val", "val"), ("select", "train")):
            if name == "select" and not cfg.export_best:
                continue
            windows, n = spread_window_dataset(cfg.data_root, cfg.game, split, cfg.clip_length, cfg.clip_stride,
                                               cfg.val_windows)
            if not n:  # a tiny collection: the loop checks nothing rather than fail
                why = (" (a collection made before the val split existed has none: collect with "
                       "CollectConfig.val_fraction > 0)" if split == "val" else "")
                print(f"[train] {cfg.name}: no {split} windows of {cfg.clip_length} frames in {cfg.data_root}{why}; "
                      f"val_every set to 0", flush=True)
                side, cfg = {}, dataclasses.replace(cfg, val_every=0)
                break
            side[name] = windows.select_columns(["frames"])
    with Tracker(cfg.run_dir, cfg.name, tracking_uri=tracking_uri, tags={"job": "vae"}) as tracker:
        tracker.log_params(cfg)
        tracker.log_dataset(**training_data_input(cfg.data_root, cfg.game, cfg.train_episodes))
        result = fit(vae_loop, cfg, ds, tracker, side_datasets=side)
        state = _load_state(result)
        vae = build_vae(cfg)
        # The EMA weights of the best check (TrainVAEConfig.export_best), else the last step's.
        best = state.get("best_ema") is not None
        vae.load_state_dict(state["best_ema"] if best else state["ema"])
        exported = int(state["best_step"]) if best else int(state["step"])
        out = save_vae(Path(cfg.run_dir) / "models" / cfg.name, vae)
        tracker.log_artifact(out, "vae")
        tracker.set_tags({"train/final_step": str(state["step"]), "vae/exported_step": str(exported)})
        print(f"[train] {cfg.name}: exported the EMA weights of step {exported} of {state['step']}"
              + (f" (lowest val/mse_train, {state['best_mse']:.3f})" if best else ""), flush=True)
    return out


@torch.no_grad()
def measure_latent_scale(vae_path: str, data_root: str, game: str, length: int, num_clips: int = 32) -> float:
    """1 / std of the VAE's latent means over up to `num_clips` clips of `length` consecutive steps
    from the first training rows read (unit-variance latents suit the rectified flow's N(0, I)
    noise). Reads rows, not Ray Data windows: no shuffle of the whole dataset for 64 clips."""
    from workers.frame_store import FrameStore

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(vae_path, device)
    rows = frame_dataset(data_root, game, "train").limit(max(num_clips * length * 4, 1024))
    store = FrameStore.from_batches(rows.iter_batches(batch_size=1024, batch_format="pyarrow"),
                                    torch.device("cpu"), source=f"{data_root} (latent scale)")
    starts = store.starts(length)
    if len(starts) == 0:
        raise ValueError(f"no {length} consecutive training steps of {game or 'any game'} in the first "
                         f"{len(store)} rows of {data_root}")
    pick = starts[torch.linspace(0, len(starts) - 1, min(num_clips, len(starts))).long()]
    frames = store.values[store.order[pick[:, None] + torch.arange(length)]]  # (k, L, H, W, 3)
    mean = torch.cat([vae.encode(pixels_to_model(f.to(device)))[0].float() for f in frames.split(8)])
    std = float(mean.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latent std over {len(frames)} clips is {std}: is the VAE at {vae_path} trained?")
    return 1.0 / std


def train_dit_main(cfg: TrainDiTConfig, tracking_uri: str | None = None) -> Path:
    """Train the DiT on the frozen VAE; returns the exported world-model directory."""
    cfg = _absolute(cfg)
    if not cfg.vae_path:
        raise ValueError("TrainDiTConfig.vae_path is empty: train the VAE first (train_vae_main)")
    _ensure_ray()
    if cfg.latent_scale <= 0:
        # Measured once per run and kept: a resumed run must train on the same latent scale.
        saved = Path(cfg.run_dir) / f"{cfg.name}.latent_scale.json"
        if saved.exists():
            scale = json.loads(saved.read_text())["latent_scale"]
        else:
            scale = measure_latent_scale(cfg.vae_path, cfg.data_root, cfg.game, cfg.clip_length)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"latent_scale": scale, "vae_path": cfg.vae_path}))
        cfg = dataclasses.replace(cfg, latent_scale=scale)
    ds = training_dataset(cfg, cfg.clip_length, cfg.clip_stride)
    with Tracker(cfg.run_dir, cfg.name, tracking_uri=tracking_uri, tags={"job": "dit"}) as tracker:
        tracker.log_params(cfg)
        tracker.log_dataset(**training_data_input(cfg.data_root, cfg.game, cfg.train_episodes))
        result = fit(dit_loop, cfg, ds, tracker)
        state = _load_state(result)
        vae = load_vae(cfg.vae_path)
        dit = build_dit(cfg, vae.cfg.latent_channels)
        dit.load_state_dict(state["ema"])
        extra = {"game": cfg.game, "train_config": dataclasses.asdict(cfg)}

        def meta(**more):
            return world_model_meta(dit, latent_scale=cfg.latent_scale, n_cond=cfg.n_cond, horizon=cfg.horizon,
                                    action_mode=cfg.action_mode, sample_steps=cfg.sample_steps,
                                    trained_horizons=cfg.trained_horizons, extra={**extra, **more})

        out = save_world_model(Path(cfg.run_dir) / "models" / cfg.name, vae, dit, meta(train_step=state["step"]))
        tracker.log_artifact(out, "world_model")
        # The same directory as an MLflow model: models:/<id>, runs:/<run id>/world_model_pyfunc.
        uri = tracker.log_world_model(out, step=int(state["step"]))
        if uri:
            print(f"[train] {cfg.name}: world model logged to MLflow as {uri}", flush=True)
        tracker.set_tags({"train/final_step": str(state["step"])})
        for at in cfg.snapshot_s:  # the same run's EMA weights after `at` seconds of training
            path = snapshot_path(cfg.run_dir, cfg.name, at)
            if not path.exists():  # the run ended before `at` seconds
                continue
            snap = torch.load(path, map_location="cpu", weights_only=True)
            dit.load_state_dict(snap["ema"])
            save_world_model(Path(cfg.run_dir) / "models" / snapshot_name(cfg.name, at), vae, dit,
                             meta(train_step=snap["step"], snapshot={"at_s": at, "step": snap["step"],
                                                                     "elapsed_s": snap["elapsed_s"]}))
            tracker.set_tags({f"train/snapshot_at{at:g}s_step": str(snap["step"])})
    return out


# -- command line ----------------------------------------------------------------------------------
def parse_config(cls: type, argv: list[str] | None = None):
    """A config dataclass from `--field value` flags (tuples as comma lists, bools as true/false)."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:
            elem = typing.get_args(kind)[0]
            conv = lambda s, elem=elem: tuple(elem(v) for v in s.split(",") if v)  # noqa: E731
        elif kind is bool:
            conv = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        else:
            conv = kind
        parser.add_argument(f"--{f.name}", type=conv, default=f.default)
    return cls(**vars(parser.parse_args(argv)))


def pop_tracking_uri(argv: list[str]) -> tuple[list[str], str | None]:
    """`--tracking_uri URI` (else MLFLOW_TRACKING_URI, else the run directory's sqlite store)."""
    if "--tracking_uri" not in argv:
        return argv, None
    i = argv.index("--tracking_uri")
    return argv[:i] + argv[i + 2:], argv[i + 1]


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("vae", "dit"):
        raise SystemExit("usage: python pipeline/train.py {vae|dit} [--tracking_uri URI] [--field value ...]")
    rest, uri = pop_tracking_uri(argv[1:])
    if argv[0] == "vae":
        return train_vae_main(parse_config(TrainVAEConfig, rest), tracking_uri=uri)
    return train_dit_main(parse_config(TrainDiTConfig, rest), tracking_uri=uri)


if __name__ == "__main__":
    print(main())
