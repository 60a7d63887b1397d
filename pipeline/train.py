"""Training drivers: `train_vae_main(cfg)` then `train_dit_main(cfg)`, each one Ray Train run.

    python -m pipeline.train vae --run-dir /abs/runs/x --data-root /abs/data --steps 2000
    python -m pipeline.train dit --run-dir /abs/runs/x --data-root /abs/data --vae-path /abs/runs/x/models/vae
    python -m pipeline.train vae --help             # every setting, with its meaning and default

Layout of a run directory (`cfg.run_dir`, made absolute here, because Ray Train storage and
`ray job submit`'s temporary working directory both need absolute paths):

    <run_dir>/train/<name>/            Ray Train storage of the run: checkpoints, resume state, and
        metrics.jsonl                  rank 0's metric lines (see workers/train_loop.py)
        latent_scale.json              the DiT run's measured latent scale (reused on resume)
        snapshots/                     the DiT's EMA weights at `snapshot_s` seconds
    <run_dir>/models/<name>/           exported EMA weights: the VAE, or the whole world model
    <run_dir>/mlflow.db, mlartifacts/  the default MLflow store (pipeline/tracking.py)

Metrics reach MLflow from the driver only: while `fit()` runs, a thread follows the JSONL and logs
each new line (so the MLflow UI shows live progress); lines written before this `fit()` were logged
by the driver that saw them. Restarting with the same `name` resumes from the last checkpoint (Ray
Train finds it in `<run_dir>/train/<name>/`) and continues the same MLflow run. A crashed worker group is
restarted from the last checkpoint up to `max_failures` times (FailureConfig). A loop that meets a
non-finite loss stops; the driver raises `NonFiniteLossError` naming the step and the last good
checkpoint, which stays in storage.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/train.py`): run again as `python -m pipeline.train`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.train", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np
import torch

from pipeline import cli
from pipeline.cluster import ensure_ray
from pipeline.tracking import Tracker
from workers.data import frame_dataset, spread_window_dataset, training_data_input, training_dataset
from models.pixels import pixels_to_model
from workers.train_common import NONFINITE_EVENT, NonFiniteLossError, TrainSettings, metrics_path, train_dir
from workers.train_dit import TrainDiTConfig, build_dit, snapshot_name, snapshot_path
from workers.train_dit import train_loop_per_worker as dit_loop
from workers.train_vae import TrainVAEConfig, build_vae
from workers.train_vae import train_loop_per_worker as vae_loop
from workers.world_model import load_vae, save_vae, save_world_model, world_model_meta


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


def worker_resources(cfg: TrainSettings) -> dict[str, float]:
    """What each Ray Train worker asks for: its CPUs, and its GPU share when training on GPUs."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def fit(loop: Callable[[dict], None], cfg: TrainSettings, dataset, tracker: Tracker,
        side_datasets: dict[str, Any] | None = None):
    """Build and fit the TorchTrainer of one job; returns its Result (checkpoint = last good one).
    `side_datasets` (the VAE job's "val" held-out windows and "select" training windows) reach
    every worker whole; the training one is split over them."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        loop,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": dataset, **(side_datasets or {})},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            storage_path=str(train_dir(cfg.run_dir, cfg.name).parent), name=cfg.name,
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


# -- the two jobs ----------------------------------------------------------------------------------
def train_vae_main(cfg: TrainVAEConfig, tracking_uri: str | None = None) -> Path:
    """Train the VAE; returns the directory of its exported EMA weights (for TrainDiTConfig.vae_path)."""
    cfg = _absolute(cfg)
    ensure_ray()
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
    ensure_ray()
    if cfg.latent_scale <= 0:
        # Measured once per run and kept: a resumed run must train on the same latent scale.
        saved = train_dir(cfg.run_dir, cfg.name) / "latent_scale.json"
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
def main(argv: list[str] | None = None) -> Path:
    job, cfg, uri = cli.parse_command({"vae": TrainVAEConfig, "dit": TrainDiTConfig}, argv, description=__doc__)
    return (train_vae_main if job == "vae" else train_dit_main)(cfg, tracking_uri=uri)


if __name__ == "__main__":
    print(main())
