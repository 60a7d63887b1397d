"""VAE training loop, run by a Ray Train TorchTrainer on each worker (DDP, CPU or GPU).

The driver (`pipeline/train.py`) hands in `dataclasses.asdict(TrainVAEConfig)` and a Ray Dataset
of clips (column `frames`, uint8 (L, 210, 160, 3)); this loop reconstructs the config (unknown keys
fail), resumes from the run's last checkpoint if there is one, and trains for `steps` optimiser
steps, reporting metrics and checkpoints through Ray Train (see `workers/train_common.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.vae import VAE_models, VideoVAE, vae_loss
from workers.frame_store import window_generator
from workers.train_common import (
    EMA, JsonlLog, TrainSettings, autocast, config_from_dict, gpu_ids, infinite_batches, load_frame_store, restore,
    make_optimizer, make_scheduler, RunClock, maybe_crash, mean_across_ranks, metrics_path, model_to_pixels,
    optimizer_step, pixels_to_model, rank_and_world, report, save_checkpoint, seed_everything, skip_counter, stop_if_skipped,
)


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


def whole_dataset_frames(name: str, device: torch.device) -> torch.Tensor | None:
    """A side dataset of the driver's, given whole to every worker, read onto `device`: "val", the
    held-out windows (whenever val_every > 0), or "select", the fixed training windows that
    export_best scores. None when it holds no window."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise RuntimeError(f"the VAE job was given no {name!r} dataset: with val_every > 0 the driver passes "
                           f"'val' (held-out windows) and, with export_best, 'select' (training windows)")
    parts = [torch.as_tensor(np.stack(b["frames"])) for b in shard.iter_batches(batch_size=64, batch_format="numpy")]
    return torch.cat(parts).to(device) if parts else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(TrainVAEConfig, config)
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)

    vae = build_vae(cfg).to(device)
    ema = EMA(vae, cfg.ema_decay)
    opt = make_optimizer(vae, cfg)
    clock = RunClock(cfg, device)
    sched = make_scheduler(opt, cfg, clock)
    skipped = skip_counter(opt, device)  # the fused optimiser's non-finite steps, read at log steps
    restored: dict[str, Any] = {}  # the checkpoint's kept best weights, if any
    step = restore(device, vae, ema, opt, sched, restored)  # a resumed run, or a FailureConfig restart
    model = ray.train.torch.prepare_model(vae)  # DDP over the workers (gloo on CPU, NCCL on GPU)
    if cfg.compile:
        model = torch.compile(model)
    log = JsonlLog(metrics_path(cfg.run_dir, cfg.name), active=rank == 0)
    log.write({"event": "start", "step": step, "world_size": world, "gpu_ids": gpu_ids()})  # rank 0's
    if cfg.data_loader == "device":
        store, gen = load_frame_store(cfg, device, log), None

        def next_frames(step: int) -> torch.Tensor:
            nonlocal gen
            gen = window_generator(device, cfg.seed, rank, step, gen)
            return store.sample(cfg.batch_size, cfg.clip_length, gen)[0]  # (B, L, H, W, 3)
    else:
        batches = infinite_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, ("frames",))

        def next_frames(step: int) -> torch.Tensor:
            return next(batches)["frames"].to(device, non_blocking=True)  # (B, L, H, W, 3)

    def checkpoint(d):
        save_checkpoint(d, model=model, ema=ema, opt=opt, sched=sched, step=step, config=cfg,
                        extra=best.state() if best is not None else None)

    val_frames = whole_dataset_frames("val", device) if cfg.val_every > 0 and rank == 0 else None
    best, select_frames = None, None
    if cfg.val_every > 0 and cfg.export_best and rank == 0:
        best, select_frames = BestWeights(restored), whole_dataset_frames("select", device)
        if select_frames is None:
            raise RuntimeError("export_best: the 'select' dataset holds no window of the training split")

    def check_heldout() -> None:
        line: dict[str, Any] = {"step": step}
        if val_frames is not None:
            line.update(heldout_reconstruction(val_frames, ema.model, vae, device, cfg.bf16, seed=cfg.seed))
        if best is not None:
            line["val/mse_train"] = mean_reconstruction_error(ema.model, select_frames)[0]
            if best.offer(step, line["val/mse_train"], ema.model):
                line["val/best_step"] = step
        if len(line) > 1:
            log.write(line)

    t_last = clock.start()
    steps_since, reported_step = 0, -1
    while step < cfg.steps:
        maybe_crash(cfg, step)
        x = pixels_to_model(next_frames(step))  # (B, T, 3, H, W)
        with autocast(device, cfg.bf16):
            recon, mean, logvar = model(x)
        # The loss in float32: a bf16 mean over ~10^6 pixels loses the small reconstruction errors.
        loss, parts = vae_loss(x, recon.float(), mean.float(), logvar.float(), cfg.kl_weight,
                               recon_kind=cfg.recon_kind)
        if step == cfg.nan_at_step:
            loss = loss * float("nan")
        ok, grad_norm = optimizer_step(loss, model, opt, sched, ema, cfg, step, log, skipped)
        if not ok:
            return  # the driver turns the logged event into NonFiniteLossError
        step += 1
        steps_since += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            m = mean_across_ranks({f"train/{k}": float(v) for k, v in parts.items()}, device)
            m["train/loss"] = m.pop("train/total")
            m.update({"train/grad_norm": float(grad_norm), "train/lr": sched.get_last_lr()[0],
                      "train/steps_per_s": steps_since / max(now - t_last, 1e-9)})
            log.write({"step": step, **m})
            t_last, steps_since = now, 0
            if stop_if_skipped(skipped, step, log):
                return  # a non-finite step was skipped on the device since the last log step
        if cfg.val_every > 0 and step % cfg.val_every == 0:
            check_heldout()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            report({"step": step, "train/loss": float(loss.detach())}, checkpoint_fn=checkpoint)
            reported_step = step
        if step % cfg.log_every == 0 and clock.check():
            log.write({"event": "time_budget", "step": step, "message": f"max_train_s={cfg.max_train_s} spent at step {step}"})
            break
    if cfg.val_every > 0 and step % cfg.val_every != 0:
        check_heldout()  # the exported weights' own check
    if reported_step != step:  # stopped by the time budget, or restarted after the last step
        report({"step": step}, checkpoint_fn=checkpoint)
