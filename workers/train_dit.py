"""The DiT job's part of the training loop (`workers/train_loop.py`), with the VAE frozen, run by
a Ray Train TorchTrainer on each worker.

Each sample is a window of L = n_cond + horizon frames with its actions. Pixels uint8
(B, L, 210, 160, 3) -> [-1, 1] (B, L, 3, H, W) -> frozen VAE encoder mean x latent_scale ->
rectified-flow loss, noise and loss on the latent frames that hold future frames only
(frame_mask), condition latents clean. With the "device" loader and a frame-wise VAE the latents
of the worker's whole shard are computed once before training; otherwise the VAE encodes each
batch's windows. The DiT supplies its network, each step's generation length and latents, the
loss, and the EMA snapshots at `snapshot_s`; the loop does the rest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.action_encoder import ACTION_MODES, action_positions, num_action_tokens
from models.config import config_from_dict
from models.pixels import pixels_to_model
from models.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.stdit import STDiT, STDiT_models
from workers.clips import split_sample
from workers.train_common import TrainSettings, autocast, train_dir
from workers.train_loop import TrainComponent, TrainLoop, Windows, train
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
    return train_dir(run_dir, name) / "snapshots" / f"at{at_s:g}s.pt"


def snapshot_name(name: str, at_s: float) -> str:
    """The exported world model's name of the snapshot at `at_s` seconds."""
    return f"{name}-at{at_s:g}s"


def build_dit(cfg: TrainDiTConfig, latent_channels: int) -> STDiT:
    return STDiT_models[cfg.dit_preset](in_channels=latent_channels, num_actions=cfg.num_actions,
                                        action_encoder=cfg.action_encoder, patch_size=tuple(cfg.patch_size))


@dataclass(frozen=True)
class DiTBatch:
    """One step's training batch, on the device."""

    x0: torch.Tensor
    """(B, T', C, h, w) scaled latents of the windows."""
    latent_mask: torch.Tensor
    """(B, T') bool, True = a latent frame to generate (holds a future frame)."""
    actions: torch.Tensor
    """(B, A) int64 action tokens."""
    positions: torch.Tensor
    """(A,) clip frame index of each action token."""


class DiTComponent(TrainComponent):
    """The rectified-flow loss of the ST-DiT on the frozen VAE's latents."""

    columns = ("frames", "actions")

    def __init__(self, cfg: TrainDiTConfig):
        if cfg.latent_scale <= 0:
            raise ValueError("TrainDiTConfig.latent_scale must be set (the driver measures it) before training")
        super().__init__(cfg)
        self.flow = RectifiedFlow(RectifiedFlowConfig(t_sampling=cfg.t_sampling, logit_mean=cfg.t_logit_mean,
                                                      action_dropout=cfg.action_dropout))
        # The generation length of each step: one draw per step from a generator seeded by the step,
        # so every DDP rank (and a resumed run) picks the same T.
        self.pick = torch.Generator().manual_seed(cfg.seed)
        self.vae = None
        self.latents = False  # whether the windows hold latent means (the store's, encoded once)
        self.pending: list[float] = []  # snapshot times still to take, rank 0

    def build(self, device: torch.device) -> STDiT:
        cfg = self.cfg
        self.vae = load_vae(cfg.vae_path, device)  # frozen, eval
        if cfg.n_cond % self.vae.frames_per_latent:
            raise ValueError(f"n_cond={cfg.n_cond} is not a multiple of the VAE's temporal factor "
                             f"{self.vae.frames_per_latent}")
        return build_dit(cfg, self.vae.cfg.latent_channels).to(device)

    def prepare_store(self, loop: TrainLoop, store) -> None:
        vae = self.vae
        if not (vae.cfg.temporal_kernel == 1 and vae.frames_per_latent == 1):
            return
        t0 = time.time()  # a frame-wise VAE: each frame's latent once, instead of a VAE pass per step
        with autocast(loop.device, self.cfg.bf16):
            store.encode_frames(lambda f: vae.encode(pixels_to_model(f))[0])
        self.latents = True
        loop.log.write({"event": "latents", "rows": len(store), "shape": list(store.values.shape[1:]),
                        "encode_s": round(time.time() - t0, 1)})

    def start(self, loop: TrainLoop) -> None:
        # A restarted run keeps the snapshots its earlier attempt wrote.
        cfg = self.cfg
        self.pending = sorted(s for s in cfg.snapshot_s if not snapshot_path(cfg.run_dir, cfg.name, s).exists())

    def batch(self, step: int, windows: Windows) -> DiTBatch:
        cfg = self.cfg
        horizons = cfg.trained_horizons
        self.pick.manual_seed(cfg.seed * 1_000_003 + step)
        T = horizons[int(torch.randint(len(horizons), (1,), generator=self.pick))]
        L = cfg.n_cond + T
        values, window_actions = windows(step, L)  # (B, L, ...), (B, L)
        device = values.device
        _, _, actions = split_sample(values, window_actions.long(), cfg.n_cond, T, cfg.action_mode)  # (B, A)
        positions = action_positions(actions.shape[1], cfg.n_cond, cfg.action_mode, device=device)
        frame_mask = torch.arange(L, device=device) >= cfg.n_cond  # (L,) True = generated
        B = values.shape[0]
        if self.latents:
            x0 = values * cfg.latent_scale  # (B, L, C, h, w) cached latent means
        else:
            with torch.no_grad(), autocast(device, cfg.bf16):
                mean, _ = self.vae.encode(pixels_to_model(values))  # (B, T', C, h, w)
            x0 = mean.float() * cfg.latent_scale
        return DiTBatch(x0, self.vae.latent_frame_mask(frame_mask.expand(B, L)), actions, positions)

    def loss_and_logs(self, model, batch: DiTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(batch.x0.device, self.cfg.bf16):
            loss = self.flow.loss(model, batch.x0, batch.latent_mask, actions=batch.actions,
                                  action_positions=batch.positions)
        return loss, {}

    def after_step(self, loop: TrainLoop) -> None:
        """Rank 0 keeps the EMA weights once training has run each `snapshot_s` seconds."""
        cfg, step = self.cfg, loop.step
        if not (self.pending and loop.rank == 0 and step % cfg.log_every == 0):
            return
        elapsed = loop.clock.elapsed()
        while self.pending and elapsed >= self.pending[0]:
            at = self.pending.pop(0)
            path = snapshot_path(cfg.run_dir, cfg.name, at)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"ema": loop.ema.model.state_dict(), "step": step, "elapsed_s": elapsed}, tmp)
            os.replace(tmp, path)  # whole or absent
            loop.log.write({"event": "snapshot", "at_s": at, "step": step, "elapsed_s": round(elapsed, 1)})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    train(DiTComponent(config_from_dict(TrainDiTConfig, config)))
