"""The one training loop of the VAE and DiT jobs, run inside each Ray Train worker.

A model supplies a `TrainComponent`: its network (`build`), each step's batch (`batch`), the loss
and the scalars logged beside it (`loss_and_logs`), and the few hooks it needs. `train(component)`
owns the rest: seeding, the optimiser, LR schedule and EMA, resume, DDP, data iteration, the
non-finite guard, metric lines, checkpoints, the time budget and the test-only crash and NaN
injections. One step, on every rank:

    batch -> loss_and_logs -> optimizer_step (clip, AdamW, EMA) -> metric line (every log_every)
          -> after_step hook -> checkpoint report (every checkpoint_every) -> clock check (every log_every)

The loop never talks to MLflow: rank 0 appends one JSON line per logged step to
`<run_dir>/train/<name>/metrics.jsonl` (which the driver replays into MLflow, live or after `fit()`),
and every `checkpoint_every` steps (and at the last) all ranks call `ray.train.report` with rank 0
carrying the checkpoint. Ray Train's own `Result` keeps metrics only for checkpointed reports,
hence the JSONL. A checkpoint directory holds `state.pt` (model, EMA, optimiser, scheduler, step,
and the component's own entries) and `config.json` (the job's settings), so it is complete on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from workers.train_common import (
    EMA, JsonlLog, TrainSettings, gpu_ids, infinite_batches, make_optimizer, make_scheduler, mean_across_ranks,
    metrics_path, optimizer_step, rank_and_world, seed_everything, skip_counter, stop_if_skipped, unwrap,
)

Windows = Callable[[int, int], tuple[Tensor, Tensor | None]]
"""`windows(step, length) -> (values (B, L, ...), actions (B, L) int64 | None)`: one step's training
windows of `length` frames on the worker's device (actions None when the component reads none)."""


class TrainComponent:
    """What one model supplies to the loop. Subclasses implement `build`, `batch` and
    `loss_and_logs`; the other hooks do nothing unless the model needs them."""

    columns: tuple[str, ...] = ("frames",)
    """Columns of the training windows the "stream" loader carries to the device."""

    def __init__(self, cfg: TrainSettings):
        self.cfg = cfg

    @property
    def clip_length(self) -> int:
        """Frames of each training window (the "stream" loader checks its windows against it)."""
        return self.cfg.clip_length

    def build(self, device: torch.device) -> nn.Module:
        """The network to train, on `device` (called after seeding)."""
        raise NotImplementedError

    def prepare_store(self, loop: TrainLoop, store) -> None:
        """"device" loader: after this worker's shard is read into `store` (a FrameStore)."""

    def start(self, loop: TrainLoop) -> None:
        """After resume and the data, before the first step (`loop.restored`: the checkpoint's
        component entries)."""

    def batch(self, step: int, windows: Windows) -> Any:
        """The batch of optimiser step `step`, drawn from `windows`."""
        raise NotImplementedError

    def loss_and_logs(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss to minimise, 0-dim; scalars to log beside it, `train/<name>`). `model` is the
        trained network as the loop wraps it (DDP, torch.compile): run the forward through it."""
        raise NotImplementedError

    def after_step(self, loop: TrainLoop) -> None:
        """After each step's metric line, before its checkpoint (`loop.step` is the count done)."""

    def finish(self, loop: TrainLoop) -> None:
        """After the last step or the time budget's stop, before the final checkpoint."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Entries saved in each checkpoint beside the loop's (`loop.restored` on resume)."""
        return {}


class RayTrainSession:
    """What the loop asks of Ray Train. A test hands the loop a local stand-in with these methods."""

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def dataset_shard(self, name: str):
        """This worker's shard of the driver's dataset `name` (None when not given)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """DDP over the workers (gloo on CPU, NCCL on GPU)."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint_state(self, map_location: torch.device) -> dict[str, Any] | None:
        """The state of the run's latest reported checkpoint (resume or FailureConfig restart)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / "state.pt", map_location=map_location, weights_only=False)

    def report(self, metrics: dict[str, float], checkpoint_fn: Callable[[Path], None] | None = None) -> None:
        """ray.train.report on every rank; rank 0 attaches the checkpoint that checkpoint_fn(dir) writes."""
        import ray.train

        if checkpoint_fn is None:
            ray.train.report(metrics)
            return
        rank, _ = rank_and_world()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoint_fn(Path(tmp))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "step")
"""What every checkpoint holds; a component's own entries (`checkpoint_extra`) come beside them."""


def save_checkpoint(directory: Path, *, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                    sched, step: int, config: Any, extra: dict[str, Any] | None = None) -> None:
    torch.save({
        "model": unwrap(model).state_dict(),
        "ema": ema.model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        **(extra or {}),
    }, directory / "state.pt")
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))


class RunClock:
    """The run's wall clock against `max_train_s`, read by every rank at the same steps: `check()`
    takes the largest elapsed time over the ranks (the slowest decides), so that no rank stops
    while the others wait in a collective, and every rank's learning-rate cooldown sees the same
    `time_frac`."""

    def __init__(self, cfg: TrainSettings, device: torch.device):
        self.cfg, self.device = cfg, device
        self.t_start = time.time()
        self.time_frac = 0.0
        """Elapsed share of the budget at the last check (0 without a budget), at most 1."""

    def start(self) -> float:
        """Starts the clock (at the first training step, after loading); returns the time."""
        self.t_start = time.time()
        return self.t_start

    def elapsed(self) -> float:
        """This rank's seconds since `start`."""
        return time.time() - self.t_start

    def check(self) -> bool:
        """Whether the budget is spent (a collective: call it on every rank at the same step)."""
        if self.cfg.max_train_s <= 0:
            return False
        elapsed = torch.tensor([self.elapsed()], dtype=torch.float64, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        seconds = float(elapsed.item())
        self.time_frac = min(1.0, seconds / self.cfg.max_train_s)
        return seconds > self.cfg.max_train_s


def maybe_crash(cfg: TrainSettings, step: int) -> None:
    """Tests only: the last rank dies hard once (a marker file keeps the restart from dying too)."""
    if cfg.fail_at_step < 0 or step != cfg.fail_at_step:
        return
    rank, world = rank_and_world()
    marker = Path(cfg.run_dir) / f"{cfg.name}.crashed"
    if rank == world - 1 and not marker.exists():
        marker.write_text(str(step))
        print(f"[train] injected crash of rank {rank} at step {step}", flush=True)
        os._exit(1)


def load_frame_store(shard, cfg: TrainSettings, device: torch.device, log: JsonlLog):
    """The "device" loader: this worker's shard of frames, read once into `device` memory."""
    from workers.frame_store import FrameStore, shard_batches

    rank, _ = rank_and_world()
    t0 = time.time()
    store = FrameStore.from_batches(shard_batches(shard), device, max_bytes=cfg.max_store_gib * 2**30,
                                    source=f"rank {rank}'s training shard")
    log.write({"event": "frame_store", "rows": len(store), "episodes": len(store.episode_ids),
               "gib": round(store.values.numel() * store.values.element_size() / 2**30, 3),
               "load_s": round(time.time() - t0, 1)})
    return store


def store_windows(store, cfg: TrainSettings, device: torch.device, rank: int) -> Windows:
    """Random windows of the worker's FrameStore, drawn by a generator seeded by seed, rank and
    step (a resumed run draws what the uninterrupted one would have)."""
    from workers.frame_store import window_generator

    gen = None

    def windows(step: int, length: int) -> tuple[Tensor, Tensor]:
        nonlocal gen
        gen = window_generator(device, cfg.seed, rank, step, gen)
        return store.sample(cfg.batch_size, length, gen)

    return windows


def stream_windows(shard, cfg: TrainSettings, device: torch.device, columns: tuple[str, ...],
                   clip_length: int, rank: int = 0, start_step: int = 0) -> Windows:
    """The shard's windows epoch after epoch (their first `length` frames), shuffled within each
    epoch by a seed of the run's seed, the rank and the step it starts from: a resumed run does not
    replay the batches its first attempt began with (nor, as Ray Data streams blocks in the order
    they finish, the uninterrupted run's order: the "device" loader's draws are the reproducible
    ones)."""
    batches = infinite_batches(shard, cfg.batch_size, columns,
                               shuffle_seed=(cfg.seed * 1009 + rank) * 1_000_003 + start_step)

    def windows(step: int, length: int) -> tuple[Tensor, Tensor | None]:
        batch = next(batches)
        frames = batch["frames"].to(device, non_blocking=True)  # (B, clip_length, H, W, 3) uint8
        if frames.shape[1] != clip_length:
            raise ValueError(f"training windows have {frames.shape[1]} frames, expected the job's "
                             f"clip length {clip_length}")
        actions = batch["actions"][:, :length].to(device) if "actions" in batch else None
        return frames[:, :length], actions

    return windows


class TrainLoop:
    """One worker's run of a component; its attributes are what the hooks read."""

    def __init__(self, component: TrainComponent, session: RayTrainSession | None = None):
        cfg = self.cfg = component.cfg
        self.component = component
        self.session = session if session is not None else RayTrainSession()
        self.rank, self.world = rank_and_world()
        self.device = self.session.device()
        seed_everything(cfg.seed + self.rank)

        self.net = component.build(self.device)  # the plain module: EMA, checkpoints, hooks
        self.ema = EMA(self.net, cfg.ema_decay)
        self.opt = make_optimizer(self.net, cfg)
        self.clock = RunClock(cfg, self.device)
        self.sched = make_scheduler(self.opt, cfg, self.clock)
        self.skipped = skip_counter(self.opt, self.device)  # the fused optimiser's non-finite steps, read at log steps
        self.restored: dict[str, Any] = {}
        """The resumed checkpoint's component entries (empty when fresh)."""
        self.step = self.restore()  # a resumed run, or a FailureConfig restart
        self.model = self.session.prepare_model(self.net)  # what the forward runs through
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.log = JsonlLog(metrics_path(cfg.run_dir, cfg.name), active=self.rank == 0)
        self.log.write({"event": "start", "step": self.step, "world_size": self.world, "gpu_ids": gpu_ids()})
        shard = self.session.dataset_shard("train")
        if cfg.data_loader == "device":
            store = load_frame_store(shard, cfg, self.device, self.log)
            component.prepare_store(self, store)
            self.windows = store_windows(store, cfg, self.device, self.rank)
        else:
            self.windows = stream_windows(shard, cfg, self.device, component.columns, component.clip_length,
                                          self.rank, self.step)
        component.start(self)

    def restore(self) -> int:
        """Loads the latest reported checkpoint into the model, EMA, optimiser and scheduler, and
        its component entries into `restored`; returns the step to continue from (0 when fresh)."""
        state = self.session.checkpoint_state(self.device)
        if state is None:
            return 0
        self.restored.update({k: v for k, v in state.items() if k not in CHECKPOINT_KEYS})
        self.net.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return int(state["step"])

    def save(self, directory: Path) -> None:
        """The checkpoint of the current step (rank 0 writes it into `directory`)."""
        save_checkpoint(directory, model=self.model, ema=self.ema, opt=self.opt, sched=self.sched, step=self.step,
                        config=self.cfg, extra=self.component.checkpoint_extra())

    def run(self) -> None:
        cfg, component = self.cfg, self.component
        t_last = self.clock.start()
        steps_since, reported_step = 0, -1
        while self.step < cfg.steps:
            maybe_crash(cfg, self.step)
            batch = component.batch(self.step, self.windows)
            loss, logs = component.loss_and_logs(self.model, batch)
            if self.step == cfg.nan_at_step:
                loss = loss * float("nan")
            ok, grad_norm = optimizer_step(loss.float(), self.model, self.opt, self.sched, self.ema, cfg, self.step,
                                           self.log, self.skipped)
            if not ok:
                return  # the driver turns the logged event into NonFiniteLossError
            self.step += 1
            steps_since += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.time()
                m = mean_across_ranks({"train/loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}},
                                      self.device)
                m.update({"train/grad_norm": float(grad_norm), "train/lr": self.sched.get_last_lr()[0],
                          "train/steps_per_s": steps_since / max(now - t_last, 1e-9)})
                self.log.write({"step": self.step, **m})
                t_last, steps_since = now, 0
                if stop_if_skipped(self.skipped, self.step, self.log):
                    return  # a non-finite step was skipped on the device since the last log step
            component.after_step(self)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.session.report({"step": self.step, "train/loss": float(loss.detach())}, checkpoint_fn=self.save)
                reported_step = self.step
            if self.step % cfg.log_every == 0 and self.clock.check():
                self.log.write({"event": "time_budget", "step": self.step,
                                "message": f"max_train_s={cfg.max_train_s} spent at step {self.step}"})
                break
        component.finish(self)
        if reported_step != self.step:  # stopped by the time budget, or restarted after the last step
            self.session.report({"step": self.step}, checkpoint_fn=self.save)


def train(component: TrainComponent, session: RayTrainSession | None = None) -> None:
    """Trains `component` to its config's `steps` (or time budget) in this worker."""
    TrainLoop(component, session).run()
