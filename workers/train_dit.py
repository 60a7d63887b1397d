"""ST-DiT training loop with the VAE frozen, run by a Ray Train TorchTrainer on each worker.

Each sample is a window of L = n_cond + horizon frames with its actions. Pixels uint8
(B, L, 210, 160, 3) -> [-1, 1] (B, L, 3, H, W) -> frozen VAE encoder mean x latent_scale ->
rectified-flow loss, noise and loss on the latent frames that hold future frames only
(frame_mask), condition latents clean. With the "device" loader and a frame-wise VAE the latents
of the worker's whole shard are computed once before training; otherwise the VAE encodes each
batch's windows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.action_encoder import ACTION_MODES, action_positions, num_action_tokens
from models.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.stdit import STDiT, STDiT_models
from workers.clips import split_sample
from workers.frame_store import window_generator
from workers.train_common import (
    EMA, JsonlLog, TrainSettings, autocast, config_from_dict, gpu_ids, infinite_batches, load_frame_store, restore,
    make_optimizer, make_scheduler, RunClock, maybe_crash, mean_across_ranks, metrics_path, optimizer_step,
    pixels_to_model, rank_and_world, report, save_checkpoint, seed_everything, skip_counter, stop_if_skipped,
)
from workers.world_model import load_vae


@dataclass(frozen=True)
class TrainDiTConfig(TrainSettings):
    """Settings of one DiT training run (field names match tune_spaces)."""

    name: str = "dit"
    """Run name (resume key)."""
    vae_path: str = ""
    """Directory of the trained VAE (vae.pt + vae.json), frozen here."""
    latent_scale: float = 0.0
    """Multiplier that gives the latents unit std; 0 = measured on data by the driver before training."""
    dit_preset: str = "tiny"
    """ST-DiT size, a key of models.stdit.STDiT_models."""
    n_cond: int = 4
    """Condition frames n."""
    horizon: int = 4
    """Generated frames T (the generation length); windows hold n_cond + horizon frames."""
    horizon_choices: tuple[int, ...] = ()
    """Train one model for several generation lengths: each step draws T from these (all <= horizon)
    and uses the first n_cond + T frames of its windows. Empty = always `horizon`."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """ST-DiT (time, height, width) patch over the latent."""
    action_mode: str = "future"
    """"future": a_t..a_{t+T-1} (T tokens); "past_future": a_{t-n+1}..a_{t+T-1} (n+T-1 tokens)."""
    action_encoder: str = "embedding"
    """"embedding" (learned) or "onehot"."""
    num_actions: int = 18
    """Size of the action vocabulary (18 = ALE's full action set covers every game)."""
    clip_stride: int = 2
    """Stride of the training windows over each episode."""
    t_sampling: str = "logit_normal"
    """Training timestep distribution, "logit_normal" or "uniform"."""
    t_logit_mean: float = 2.0
    """Mean of the logit-normal timesteps. Noisy timesteps (median t = sigmoid(2) = 0.88) are where
    the dynamics are learned: near t = 1 noise hides the future, at small t the noisy input already
    shows it. On the procedural sprite game (tests/test_learning.py) mean 0 did not beat copy-last
    after 1,000 steps while mean 2 reached 0.05-0.08x its error."""
    action_dropout: float = 0.0
    """Probability of dropping a sample's actions (trains the unconditional model for guidance)."""
    sample_steps: int = 8
    """Euler steps the exported world model samples with."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    snapshot_s: tuple[float, ...] = ()
    """Seconds of training at which rank 0 also keeps the EMA weights; the driver exports each as
    the world model `models/<name>-at<s>s` beside the final one. Evaluating it says what the same
    run scores with less training: the measured slope of error against training time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(s < 0 for s in self.snapshot_s):
            raise ValueError(f"TrainDiTConfig.snapshot_s={self.snapshot_s} must be seconds >= 0")
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"TrainDiTConfig.action_mode={self.action_mode!r}; expected one of {ACTION_MODES}")
        if self.dit_preset not in STDiT_models:
            raise ValueError(f"TrainDiTConfig.dit_preset={self.dit_preset!r}; presets: {sorted(STDiT_models)}")
        if any(h < 1 or h > self.horizon for h in self.horizon_choices):
            raise ValueError(f"TrainDiTConfig.horizon_choices={self.horizon_choices} must lie in 1..horizon={self.horizon}")
        if self.n_cond < 1 or self.horizon < 1:
            raise ValueError(f"TrainDiTConfig needs n_cond >= 1 and horizon >= 1, got {self.n_cond}, {self.horizon}")

    @property
    def clip_length(self) -> int:
        return self.n_cond + self.horizon

    def action_tokens(self, horizon: int) -> int:
        """Action tokens of a window that generates `horizon` frames."""
        return num_action_tokens(self.n_cond, horizon, self.action_mode)

    @property
    def num_action_tokens(self) -> int:
        """Action tokens of a window of the longest horizon."""
        return self.action_tokens(self.horizon)

    @property
    def trained_horizons(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.horizon_choices))) or (self.horizon,)


def snapshot_path(run_dir: str | Path, name: str, at_s: float) -> Path:
    """Where the EMA weights kept at `at_s` seconds of training of run `name` live."""
    return Path(run_dir) / "snapshots" / name / f"at{at_s:g}s.pt"


def snapshot_name(name: str, at_s: float) -> str:
    """The exported world model's name of the snapshot at `at_s` seconds."""
    return f"{name}-at{at_s:g}s"


def build_dit(cfg: TrainDiTConfig, latent_channels: int) -> STDiT:
    return STDiT_models[cfg.dit_preset](in_channels=latent_channels, num_actions=cfg.num_actions,
                                        action_encoder=cfg.action_encoder, patch_size=tuple(cfg.patch_size))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(TrainDiTConfig, config)
    if cfg.latent_scale <= 0:
        raise ValueError("TrainDiTConfig.latent_scale must be set (the driver measures it) before training")
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)

    vae = load_vae(cfg.vae_path, device)  # frozen, eval
    if cfg.n_cond % vae.frames_per_latent:
        raise ValueError(f"n_cond={cfg.n_cond} is not a multiple of the VAE's temporal factor {vae.frames_per_latent}")
    dit = build_dit(cfg, vae.cfg.latent_channels).to(device)
    ema = EMA(dit, cfg.ema_decay)
    opt = make_optimizer(dit, cfg)
    clock = RunClock(cfg, device)
    sched = make_scheduler(opt, cfg, clock)
    skipped = skip_counter(opt, device)  # the fused optimiser's non-finite steps, read at log steps
    step = restore(device, dit, ema, opt, sched)  # a resumed run, or a FailureConfig restart
    model = ray.train.torch.prepare_model(dit)
    if cfg.compile:
        model = torch.compile(model)
    flow = RectifiedFlow(RectifiedFlowConfig(t_sampling=cfg.t_sampling, logit_mean=cfg.t_logit_mean,
                                             action_dropout=cfg.action_dropout))
    log = JsonlLog(metrics_path(cfg.run_dir, cfg.name), active=rank == 0)
    log.write({"event": "start", "step": step, "world_size": world, "gpu_ids": gpu_ids()})  # rank 0's
    # Training windows: (pixels or latents (B, L, ...), actions (B, L)) for a window length L.
    framewise = vae.cfg.temporal_kernel == 1 and vae.frames_per_latent == 1
    if cfg.data_loader == "device":
        store, gen = load_frame_store(cfg, device, log), None
        if framewise:  # each frame's latent once, instead of a VAE pass per step
            t0 = time.time()
            with autocast(device, cfg.bf16):
                store.encode_frames(lambda f: vae.encode(pixels_to_model(f))[0])
            log.write({"event": "latents", "rows": len(store), "shape": list(store.values.shape[1:]),
                       "encode_s": round(time.time() - t0, 1)})

        def next_windows(step: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal gen
            gen = window_generator(device, cfg.seed, rank, step, gen)
            return store.sample(cfg.batch_size, L, gen)
    else:
        framewise = False
        batches = infinite_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, ("frames", "actions"))

        def next_windows(step: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
            batch = next(batches)
            frames = batch["frames"].to(device, non_blocking=True)  # (B, n+horizon, H, W, 3) uint8
            if frames.shape[1] != cfg.clip_length:
                raise ValueError(f"training windows have {frames.shape[1]} frames, expected "
                                 f"n_cond+horizon={cfg.clip_length}")
            return frames[:, :L], batch["actions"][:, :L].to(device)

    # The generation length of each step: one draw per step from a generator seeded by the step,
    # so every DDP rank (and a resumed run) picks the same T.
    horizons = cfg.trained_horizons
    pick = torch.Generator().manual_seed(cfg.seed)

    def checkpoint(d):
        save_checkpoint(d, model=model, ema=ema, opt=opt, sched=sched, step=step, config=cfg)

    t_last = clock.start()
    steps_since, reported_step = 0, -1
    # Snapshots still to take (a restarted run keeps the ones its earlier attempt wrote).
    pending = sorted(s for s in cfg.snapshot_s if not snapshot_path(cfg.run_dir, cfg.name, s).exists())
    while step < cfg.steps:
        maybe_crash(cfg, step)
        pick.manual_seed(cfg.seed * 1_000_003 + step)
        T = horizons[int(torch.randint(len(horizons), (1,), generator=pick))]
        L = cfg.n_cond + T
        values, window_actions = next_windows(step, L)  # (B, L, ...), (B, L)
        _, _, actions = split_sample(values, window_actions.long(), cfg.n_cond, T, cfg.action_mode)  # (B, A)
        positions = action_positions(actions.shape[1], cfg.n_cond, cfg.action_mode, device=device)
        frame_mask = torch.arange(L, device=device) >= cfg.n_cond  # (L,) True = generated
        B = values.shape[0]
        if framewise:
            x0 = values * cfg.latent_scale  # (B, L, C, h, w) cached latent means
        else:
            with torch.no_grad(), autocast(device, cfg.bf16):
                mean, _ = vae.encode(pixels_to_model(values))  # (B, T', C, h, w)
            x0 = mean.float() * cfg.latent_scale
        lat_mask = vae.latent_frame_mask(frame_mask.expand(B, L))  # (B, T')
        with autocast(device, cfg.bf16):
            loss = flow.loss(model, x0, lat_mask, actions=actions, action_positions=positions)
        if step == cfg.nan_at_step:
            loss = loss * float("nan")
        ok, grad_norm = optimizer_step(loss.float(), model, opt, sched, ema, cfg, step, log, skipped)
        if not ok:
            return
        step += 1
        steps_since += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            m = mean_across_ranks({"train/loss": float(loss.detach())}, device)
            m.update({"train/grad_norm": float(grad_norm), "train/lr": sched.get_last_lr()[0],
                      "train/steps_per_s": steps_since / max(now - t_last, 1e-9)})
            log.write({"step": step, **m})
            t_last, steps_since = now, 0
            if stop_if_skipped(skipped, step, log):
                return  # a non-finite step was skipped on the device since the last log step
        if pending and rank == 0 and step % cfg.log_every == 0:
            elapsed = clock.elapsed()
            while pending and elapsed >= pending[0]:
                at = pending.pop(0)
                path = snapshot_path(cfg.run_dir, cfg.name, at)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save({"ema": ema.model.state_dict(), "step": step, "elapsed_s": elapsed}, tmp)
                os.replace(tmp, path)  # whole or absent
                log.write({"event": "snapshot", "at_s": at, "step": step, "elapsed_s": round(elapsed, 1)})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            report({"step": step, "train/loss": float(loss.detach())}, checkpoint_fn=checkpoint)
            reported_step = step
        if step % cfg.log_every == 0 and clock.check():
            log.write({"event": "time_budget", "step": step, "message": f"max_train_s={cfg.max_train_s} spent at step {step}"})
            break
    if reported_step != step:  # stopped by the time budget, or restarted after the last step
        report({"step": step}, checkpoint_fn=checkpoint)
