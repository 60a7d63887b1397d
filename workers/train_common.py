"""The pieces of a training step that every job shares: settings, optimiser and LR schedule, EMA,
the non-finite guard, and the metric lines. The loop that runs them is `workers/train_loop.py`.

Rank 0 appends one JSON line per logged step to `<run_dir>/train/<name>/metrics.jsonl` (`JsonlLog`);
the driver replays them into MLflow (`read_metrics` reads the file back, one row per step).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


if TYPE_CHECKING:
    from workers.train_loop import RunClock

NONFINITE_EVENT = "nonfinite"


class NonFiniteLossError(RuntimeError):
    """Raised by the driver when a loop stopped on a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings every training job has; the VAE and DiT job configs extend this."""

    run_dir: str = "runs/default"
    """Directory of the whole pipeline run: Ray Train storage, metric JSONL, mlflow.db."""
    name: str = "train"
    """Name of this training run; restarting with the same name resumes from its last checkpoint."""
    data_root: str = ""
    """Root of the collected episodes (`<data_root>/episodes/game=<G>/*.parquet`)."""
    game: str = ""
    """Game to train on, as in `ALE/<game>-v5` (e.g. "Breakout"); empty = every game collected."""
    steps: int = 1000
    """Optimiser steps in total (a resumed run continues up to this count)."""
    batch_size: int = 8
    """Clips per worker per step (the global batch is batch_size x num_workers)."""
    lr: float = 1e-4
    """Peak AdamW learning rate, reached after warmup_steps."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices and kernels only (not biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear learning-rate warmup from 0, then constant (until the cooldown, if any)."""
    lr_cooldown: float = 0.0
    """Fraction of the run, at its end, over which the learning rate falls linearly to 0 (0 = no
    cooldown). The run's progress is step / steps, or with `max_train_s` the elapsed share of the
    budget if that is further, agreed by every rank every `log_every` steps (so all ranks step with
    the same rate). A restarted attempt's clock starts again, as its budget does."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still checked)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights (the EMA weights are exported)."""
    log_every: int = 10
    """Steps between metric lines."""
    checkpoint_every: int = 100
    """Steps between checkpoints reported to Ray Train (the final step always checkpoints)."""
    num_to_keep: int = 2
    """Checkpoints Ray Train keeps on storage."""
    seed: int = 0
    """Base seed; each worker adds its rank."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL), else CPU (gloo)."""
    gpus_per_worker: float = 1.0
    """With use_gpu: the share of a GPU each worker asks Ray for (below 1, several runs share one
    GPU, e.g. the trials of a sweep with `trials_per_gpu` 2)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; keep it fractional on small machines so Ray Data can read."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint that FailureConfig allows."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    compile: bool = False
    """torch.compile the network."""
    data_loader: str = "device"
    """How a worker gets its training windows. "device": it reads its shard of frames once through
    Ray Data into its device's memory and draws random windows there (workers/frame_store.py; no
    per-step host work, no epoch-boundary reshuffle); "stream": Ray Data cuts the windows
    (workers/clips.py:window_dataset) and streams them epoch after epoch through a seeded shuffle
    buffer of 8 batches, for data that does not fit in the workers' memory."""
    max_store_gib: float = 48.0
    """"device" loader: the most frame bytes one worker may hold (it fails naming this setting)."""
    train_episodes: float = 1.0
    """Share of the training split's episodes to train on, in (0, 1]: a fixed subset chosen by a
    hash of the episode id (`workers.clips.keep_episode_share`), whole episodes only. 1 = all.
    The data lever of a run: the same run at a smaller share measures what more data would give."""
    max_train_s: float = 0.0
    """Wall-clock budget of this run's loop in seconds (0 = none): past it the loop checkpoints and
    ends early, and the exported model is the one at that step."""
    fail_at_step: int = -1
    """Tests only: the last rank exits hard once at this step, to exercise FailureConfig."""
    nan_at_step: int = -1
    """Tests only: the loss becomes NaN at this step, to exercise the non-finite guard."""

    def __post_init__(self) -> None:
        if self.data_loader not in DATA_LOADERS:
            raise ValueError(f"{type(self).__name__}.data_loader={self.data_loader!r}; expected one of {DATA_LOADERS}")
        if not 0.0 < self.train_episodes <= 1.0:
            raise ValueError(f"{type(self).__name__}.train_episodes={self.train_episodes}: expected a share in (0, 1]")
        if not 0.0 < self.gpus_per_worker <= 1.0:
            raise ValueError(f"{type(self).__name__}.gpus_per_worker={self.gpus_per_worker}: "
                             f"expected a share in (0, 1]")


DATA_LOADERS = ("device", "stream")


def train_dir(run_dir: str | Path, name: str) -> Path:
    """`<run_dir>/train/<name>/`: the Ray Train storage of training run `name` (checkpoints, resume
    state), beside its metric lines, its latent scale and its snapshots."""
    return Path(run_dir) / "train" / name


def metrics_path(run_dir: str | Path, name: str) -> Path:
    return train_dir(run_dir, name) / "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The metric JSONL, one row per step: the lines of a step merged (the VAE's held-out check
    writes its own line at a training log step), a later line's values winning (a resumed run
    re-logs steps after its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    events = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "event" in rec:
            events.append(rec)
        else:
            rows[int(rec["step"])] = {**rows.get(int(rec["step"]), {}), **rec}
    return [rows[s] for s in sorted(rows)] + events


# -- inside the workers -------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gpu_ids() -> list[int]:
    """The node's GPU ids that Ray assigned to this worker (the indices nvidia-smi reports, for the
    node's own GPU utilisation log); [] on CPU or outside a Ray worker."""
    try:
        import ray

        return [int(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except (ImportError, ValueError, RuntimeError):
        return []


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def make_optimizer(model: nn.Module, cfg: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/kernels only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # One fused kernel for the whole update on GPU, instead of several per parameter tensor.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_factor(step: int, cfg: TrainSettings, time_frac: float = 0.0) -> float:
    """The learning rate's multiple of `cfg.lr` at optimiser step `step`: linear warmup, then 1,
    then the linear cooldown to 0 over the last `lr_cooldown` of the run (progress: the further of
    step / steps and `time_frac`, the elapsed share of the time budget)."""
    factor = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_cooldown > 0:
        progress = max(step / max(cfg.steps, 1), time_frac)
        factor *= min(1.0, max(0.0, (1.0 - progress) / cfg.lr_cooldown))
    return factor


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainSettings,
                   clock: "RunClock | None" = None) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` per step; the time share comes from `clock` (ranks agree on it)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, cfg, clock.time_frac if clock is not None else 0.0))


class EMA:
    """Exponential moving average of a model's weights (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used at optimiser step `step` (0-based): warmed up as (1+s)/(10+s), capped at
        `decay`. A fixed 0.999 from step 0 leaves e^-1.3 = 27% of the random initialisation in
        the average after 1,300 steps, and short runs then export a blurred, tinted model (seen
        on a 6-minute GPU run); the warm-up makes the average follow the weights early on."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else self.decay_at(step)
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA; nothing on CPU (bf16 matmuls there are slow and gain nothing)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def infinite_batches(shard, batch_size: int, columns: tuple[str, ...],
                     shuffle_seed: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Epoch after epoch of a Ray Data shard, as tensors. drop_last keeps every rank on the same
    number of steps per epoch (the shards are split equally), so no rank waits in an all-reduce
    while another starts a new epoch.

    With `shuffle_seed`, each epoch's windows pass through a local shuffle buffer of 8 batches,
    seeded by `shuffle_seed` and the epoch: the shard arrives episode by episode (the shuffle that
    cuts windows groups them so), and without it a batch would hold neighbouring windows of one
    or two episodes."""
    epoch = 0
    while True:
        n = 0
        shuffle = {} if shuffle_seed is None else {"local_shuffle_buffer_size": 8 * batch_size,
                                                   "local_shuffle_seed": (shuffle_seed * 1_000_003 + epoch) % 2**31}
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, **shuffle):
            n += 1
            yield {c: batch[c] for c in columns}
        if n == 0:
            raise RuntimeError(
                f"the training shard yielded no full batch of {batch_size} clips in epoch {epoch}: "
                "collect more data, shorten the clips or lower batch_size")
        epoch += 1


class JsonlLog:
    """Rank 0's metric lines; other ranks hold a no-op."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"time": time.time(), **record}) + "\n")


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """One all-reduce for all logged scalars."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return dict(zip(keys, t.tolist()))


def optimizer_step(loss: Tensor, model: nn.Module, opt, sched, ema: EMA, cfg: TrainSettings,
                   step: int, log: JsonlLog, skipped: Tensor | None = None) -> tuple[bool, Tensor]:
    """Backward, clip, step, EMA. Returns (ok, grad_norm). grad_norm is a 0-dim tensor on the
    model's device: read it (`float`) only when logging, since reading it waits for the optimiser
    step and the EMA update queued behind it.

    A non-finite loss or gradient updates nothing. How that is found depends on the optimiser:
    - fused AdamW (on the GPU) with a `skipped` counter (a 0-dim float tensor on the device): the
      check stays on the device. The optimiser skips its own update (its `found_inf`) and `skipped`
      counts the step; nothing here waits for the device. The caller reads the count at its log
      steps (`stop_if_skipped`) and stops there.
    - otherwise the check reads the norm on the host (the step's one wait for the device); on a
      non-finite one, rank 0 writes a `nonfinite` event and ok is False: the caller stops at once.

    DDP all-reduces gradients before clipping, so a NaN on any rank makes the norm NaN on every
    rank and all ranks take the same decision without another collective."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if skipped is not None and opt.defaults.get("fused"):
        bad = (~torch.isfinite(norm)).to(torch.float32)  # 0-dim, on the device
        opt.found_inf = bad  # read by the fused kernel: 1 leaves parameters, moments and step count as they were
        try:
            opt.step()
        finally:
            opt.found_inf = None
        skipped.add_(bad)
        sched.step()
        ema.update(unwrap(model), step)  # towards unchanged parameters on a skipped step
        return True, norm.detach()
    if not torch.isfinite(norm):
        log.write({"event": NONFINITE_EVENT, "step": step, "loss": float(loss.detach()),
                   "message": f"non-finite loss/gradient at step {step} (loss {float(loss.detach())}, "
                              f"grad norm {float(norm)}); stopped, the last good checkpoint is kept"})
        opt.zero_grad(set_to_none=True)
        return False, norm.detach()
    opt.step()
    sched.step()
    ema.update(unwrap(model), step)
    return True, norm.detach()


def skip_counter(opt, device: torch.device) -> Tensor | None:
    """The device-side count of skipped steps that `optimizer_step` keeps for a fused optimiser;
    None for any other (its check reads the host at each step)."""
    return torch.zeros((), device=device) if opt.defaults.get("fused") else None


def stop_if_skipped(skipped: Tensor | None, step: int, log: JsonlLog) -> bool:
    """At a log step: whether any step since the start had a non-finite loss or gradient (its update
    was skipped on the device); if so, writes the `nonfinite` event, and the caller stops. Reads
    one number from the device, at a step that reads the loss for the log anyway."""
    if skipped is None:
        return False
    n = int(skipped.item())
    if n:
        log.write({"event": NONFINITE_EVENT, "step": step, "skipped_steps": n,
                   "message": f"non-finite loss/gradient in {n} step(s) up to step {step}, whose updates were "
                              f"skipped; stopped, the last good checkpoint is kept"})
    return n > 0
