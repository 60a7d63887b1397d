"""The VAE job's part of the training loop (`workers/train_loop.py`), run by a Ray Train
TorchTrainer on each worker (DDP, CPU or GPU).

The driver (`pipeline/train.py`) hands in `dataclasses.asdict(TrainVAEConfig)` and a Ray Dataset
of clips (column `frames`, uint8 (L, 210, 160, 3)); with `val_every` also the "val" held-out and
"select" training windows its checks score. The VAE supplies its network, the loss on a batch of
clips, the periodic held-out check and the best check's EMA weights (export_best), kept in every
checkpoint; the loop does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.config import config_from_dict
from models.pixels import model_to_pixels, pixels_to_model
from models.vae import VAE_models, VideoVAE, vae_loss
from workers.train_common import TrainSettings, autocast
from workers.train_loop import TrainComponent, TrainLoop, Windows, train


@dataclass(frozen=True)
class TrainVAEConfig(TrainSettings):
    """Settings of one VAE training run."""

    name: str = "vae"
    """Run name (resume key)."""
    vae_preset: str = "tiny"
    """VAE size, a key of models.vae.VAE_models."""
    latent_channels: int = 4
    """Channels of the latent."""
    spatial_downsample: int = 4
    """Spatial factor of the latent grid: 2, 4 or 8 (models.vae.VAEConfig)."""
    stem_patch: int = 0
    """Space-to-depth factor of the VAE's stem (1, 2 or 4, dividing spatial_downsample); 0 = the
    preset's."""
    temporal_downsample: int = 1
    """Frames per latent frame (1, 2 or 4); the DiT's n_cond must be a multiple of it."""
    temporal_kernel: int = 3
    """Temporal extent of the VAE's causal convolutions; 1 (with temporal_downsample 1) makes a
    frame-wise VAE, whose latents the DiT job computes once for its whole shard."""
    clip_length: int = 8
    """Frames per training clip."""
    clip_stride: int = 4
    """Stride of the sliding windows over each episode."""
    kl_weight: float = 1e-4
    """Weight of the KL term (per-element mean, see models.vae.vae_loss)."""
    recon_kind: str = "l1"
    """Reconstruction loss, "l1" or "l2"."""
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    val_every: int = 0
    """Steps between rank 0's reconstruction check on held-out windows (and at the last step);
    0 = none. It logs `val/*` lines (`heldout_reconstruction`): the floor the evaluation will
    measure, and the same frames run the ways training runs the VAE, so that a held-out floor far
    above `train/recon` is told apart as the frames' or the way the VAE is run."""
    val_windows: int = 32
    """Held-out windows (of clip_length frames, spread over the test split's episodes) it scores."""
    export_best: bool = True
    """With val_every > 0: export the EMA weights of the check whose reconstruction MSE on
    `val_windows` windows of the training split, spread over its episodes (`val/mse_train`, scored
    as `val/mse`), was lowest, instead of the last step's. The L2 VAE's loss spikes now and then
    (25-2,400x in one logged step, in every GPU run since the L2 loss); the EMA then takes
    thousands of steps to shed it, and the last step's weights can reconstruct 2-6x worse than
    before the spike. Chosen on training windows, so the held-out windows stay unseen by any
    choice."""


def build_vae(cfg: TrainVAEConfig) -> VideoVAE:
    if cfg.vae_preset not in VAE_models:
        raise ValueError(f"TrainVAEConfig.vae_preset={cfg.vae_preset!r}; presets: {sorted(VAE_models)}")
    stem = {"stem_patch": cfg.stem_patch} if cfg.stem_patch else {}
    return VAE_models[cfg.vae_preset](latent_channels=cfg.latent_channels, spatial_downsample=cfg.spatial_downsample,
                                      temporal_downsample=cfg.temporal_downsample,
                                      temporal_kernel=cfg.temporal_kernel, **stem)


@torch.no_grad()
def reconstruction_error(vae: VideoVAE, frames: torch.Tensor, bf16: bool = False, sample: bool = False,
                         generator: torch.Generator | None = None) -> tuple[float, float]:
    """Summed squared error of the VAE's encode-decode of `frames` (uint8 (B, L, H, W, 3), on the
    VAE's device): (of its uint8 output on 0-255 values, as the evaluation scores it; of its float
    output on [-1, 1] x 127.5^2, as the training loss measures it). bf16: under bf16 autocast (on
    a GPU); sample: decoded from a posterior sample instead of the mean."""
    x = pixels_to_model(frames)
    with autocast(frames.device, bf16):
        mean, logvar = vae.encode(x)
        if sample:
            mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                             dtype=mean.dtype)
        rec = vae.decode(mean, x.shape[1], tuple(x.shape[-2:])).float()
    on_pixels = float(((model_to_pixels(rec).float() - frames.float()) ** 2).sum())
    return on_pixels, float(((rec - x) ** 2).sum()) * 127.5 ** 2


def mean_reconstruction_error(vae: VideoVAE, frames: torch.Tensor, bf16: bool = False, sample: bool = False,
                              generator: torch.Generator | None = None, batch: int = 16) -> tuple[float, float]:
    """`reconstruction_error` of uint8 `frames` (N, L, H, W, 3), `batch` windows at a time, as means
    per value: (MSE on 0-255, the training loss's L2 x 127.5^2)."""
    on_pixels = l2 = 0.0
    for chunk in frames.split(batch):
        a, b = reconstruction_error(vae, chunk, bf16, sample, generator)
        on_pixels, l2 = on_pixels + a, l2 + b
    n = max(frames.numel(), 1)
    return on_pixels / n, l2 / n


def heldout_reconstruction(frames: torch.Tensor, ema: VideoVAE, raw: VideoVAE, device: torch.device,
                           bf16: bool, batch: int = 16, seed: int = 0) -> dict[str, float]:
    """Reconstruction error of held-out frames (uint8 (N, L, H, W, 3) on `device`), MSE on 0-255:
    - `val/mse`: the EMA weights, float32, posterior mean, uint8 output: what the evaluation scores
      as the VAE's floor (the exported VAE is these weights);
    - `val/mse_raw`: the same with the raw weights;
    - `val/recon_train_way`: the raw weights run as a training step runs them (bf16 autocast on a
      GPU, a posterior sample), float output: `train/recon` x 127.5^2, but on held-out frames."""
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = raw.training
    raw.eval()
    try:
        return {"val/mse": mean_reconstruction_error(ema, frames, batch=batch)[0],
                "val/mse_raw": mean_reconstruction_error(raw, frames, batch=batch)[0],
                "val/recon_train_way": mean_reconstruction_error(raw, frames, bf16, True, g, batch)[1]}
    finally:
        raw.train(was_training)


class BestWeights:
    """The EMA weights of the lowest-scoring check so far (rank 0), kept on the device."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = state or {}
        self.weights: dict[str, torch.Tensor] | None = state.get("best_ema")
        self.step: int = int(state.get("best_step", -1))
        self.mse: float = float(state.get("best_mse", float("inf")))

    def offer(self, step: int, mse: float, model: VideoVAE) -> bool:
        """Keeps `model`'s weights if `mse` is the lowest yet; True when it is."""
        if not mse < self.mse:  # a NaN never wins
            return False
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.step, self.mse = step, mse
        return True

    def state(self) -> dict[str, Any]:
        """The checkpoint's entries (none before the first check)."""
        if self.weights is None:
            return {}
        return {"best_ema": self.weights, "best_step": self.step, "best_mse": self.mse}


def whole_dataset_frames(shard, name: str, device: torch.device) -> torch.Tensor | None:
    """A side dataset of the driver's (`shard`, given whole to every worker), read onto `device`:
    "val", the held-out windows (whenever val_every > 0), or "select", the fixed training windows
    that export_best scores. None when it holds no window."""
    if shard is None:
        raise RuntimeError(f"the VAE job was given no {name!r} dataset: with val_every > 0 the driver passes "
                           f"'val' (held-out windows) and, with export_best, 'select' (training windows)")
    parts = [torch.as_tensor(np.stack(b["frames"])) for b in shard.iter_batches(batch_size=64, batch_format="numpy")]
    return torch.cat(parts).to(device) if parts else None


class VAEComponent(TrainComponent):
    """The VAE's loss on random clips, with the held-out check every `val_every` steps (rank 0)."""

    def __init__(self, cfg: TrainVAEConfig):
        super().__init__(cfg)
        self.val_frames: torch.Tensor | None = None  # held-out windows (N, L, H, W, 3), rank 0
        self.select_frames: torch.Tensor | None = None  # training windows export_best scores, rank 0
        self.best: BestWeights | None = None

    def build(self, device: torch.device) -> VideoVAE:
        return build_vae(self.cfg).to(device)

    def start(self, loop: TrainLoop) -> None:
        cfg = self.cfg
        if cfg.val_every <= 0 or loop.rank != 0:
            return
        self.val_frames = whole_dataset_frames(loop.session.dataset_shard("val"), "val", loop.device)
        if cfg.export_best:
            self.best = BestWeights(loop.restored)  # the checkpoint's kept best weights, if any
            self.select_frames = whole_dataset_frames(loop.session.dataset_shard("select"), "select", loop.device)
            if self.select_frames is None:
                raise RuntimeError("export_best: the 'select' dataset holds no window of the training split")

    def batch(self, step: int, windows: Windows) -> torch.Tensor:
        return pixels_to_model(windows(step, self.cfg.clip_length)[0])  # (B, T, 3, H, W)

    def loss_and_logs(self, model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(x.device, self.cfg.bf16):
            recon, mean, logvar = model(x)
        # The loss in float32: a bf16 mean over ~10^6 pixels loses the small reconstruction errors.
        loss, parts = vae_loss(x, recon.float(), mean.float(), logvar.float(), self.cfg.kl_weight,
                               recon_kind=self.cfg.recon_kind)
        return loss, {"train/recon": parts["recon"], "train/kl": parts["kl"]}

    def after_step(self, loop: TrainLoop) -> None:
        if self.cfg.val_every > 0 and loop.step % self.cfg.val_every == 0:
            self.check(loop)

    def finish(self, loop: TrainLoop) -> None:
        if self.cfg.val_every > 0 and loop.step % self.cfg.val_every != 0:
            self.check(loop)  # the exported weights' own check

    def check(self, loop: TrainLoop) -> None:
        """The `val/*` line of this step: held-out reconstruction, and export_best's score."""
        line: dict[str, Any] = {"step": loop.step}
        if self.val_frames is not None:
            line.update(heldout_reconstruction(self.val_frames, loop.ema.model, loop.net, loop.device, self.cfg.bf16,
                                               seed=self.cfg.seed))
        if self.best is not None:
            line["val/mse_train"] = mean_reconstruction_error(loop.ema.model, self.select_frames)[0]
            if self.best.offer(loop.step, line["val/mse_train"], loop.ema.model):
                line["val/best_step"] = loop.step
        if len(line) > 1:
            loop.log.write(line)

    def checkpoint_extra(self) -> dict[str, Any]:
        return self.best.state() if self.best is not None else {}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    train(VAEComponent(config_from_dict(TrainVAEConfig, config)))
