"""DiT training throughput: samples/s, model FLOP utilisation (MFU) and GPU busy time.

Two modes, both driving the optimiser step of `workers/train_dit.py` (its RectifiedFlow loss under
bf16 autocast, `optimizer_step` with clipping and the non-finite check, EMA update):

- `synthetic`: random latents already on the device, shaped as the VAE would give them
  (210x160 through x4 -> 53x40, x8 -> 27x20; n_cond + horizon frames / temporal factor). Measures
  the model alone. MFU = (fwd+bwd FLOPs of one batch, counted by FlopCounterMode on the meta
  device as in benchmarks/model_flops.py) x steps/s / peak FLOP/s.
- `pipeline`: windows from the collected Parquet episodes through Ray Data (`workers.clips`),
  `iter_torch_batches` -> uint8 frames to the device -> frozen VAE encode -> the same step. Each
  setting is timed twice: fed by Ray Data, and on one batch kept resident on the device (same
  encode and step, no input pipeline). The input pipeline is the bottleneck when the fed rate
  falls short of the resident one; the time the loop spends waiting in `next(batches)` says by
  how much.

GPU busy is NVML's utilisation counter sampled every 0.2 s while the timed steps run.

    python -m benchmarks.bench_train --presets S B --batch-sizes 16 32 --compile eager compile
    python -m benchmarks.bench_train --mode pipeline --data-root /data/awm --presets B --batch-sizes 32
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import (
    PEAK_BF16_H100, GpuBusySampler, device_name, markdown_table, pick_device, profile_table,
    time_calls, warm_up, write_rows,
)
from pipeline.cli import parse_config
from benchmarks.model_flops import count_flops
from models.action_encoder import action_positions
from pipeline.cluster import init_ray
from models.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.stdit import STDiT_models
from models.vae import VAE_models, VideoVAE
from workers.train_common import (
    EMA, JsonlLog, autocast, infinite_batches, make_optimizer, make_scheduler, optimizer_step, skip_counter,
)
from models.pixels import pixels_to_model
from workers.clips import split_sample
from workers.train_dit import TrainDiTConfig, build_dit
from workers.world_model import load_vae

MODES = ("synthetic", "pipeline")
COMPILE_MODES = ("eager", "compile")


@dataclass(frozen=True)
class BenchTrainConfig:
    mode: str = "synthetic"
    """"synthetic" (random latents on the device) or "pipeline" (Parquet -> Ray Data -> VAE -> DiT)."""
    presets: tuple[str, ...] = ("S", "B")
    """ST-DiT presets (keys of models.stdit.STDiT_models)."""
    batch_sizes: tuple[int, ...] = (32,)
    """Clips per step."""
    compile: tuple[str, ...] = ("eager", "compile")
    """"eager" and/or "compile" (torch.compile of the network, as TrainDiTConfig.compile does)."""
    n_cond: int = 4
    """Condition frames n."""
    horizon: int = 4
    """Generated frames T; a clip is n_cond + horizon pixel frames."""
    horizon_mix: tuple[int, ...] = ()
    """Synthetic mode: generated lengths taken in turn, one per step, as training with
    `TrainDiTConfig.horizon_choices` draws them (the `gpu` preset trains T in 1, 2, 4); empty =
    `horizon` every step. FLOPs and MFU are the mix's mean per step."""
    action_mode: str = "future"
    height: int = 210
    """Pixel height the synthetic latents stand for (Atari: 210)."""
    width: int = 160
    spatial_downsample: int = 4
    """VAE spatial factor (4 or 8)."""
    temporal_downsample: int = 1
    """VAE temporal factor (1, 2 or 4)."""
    latent_channels: int = 4
    patch_size: tuple[int, ...] = (1, 2, 2)
    """ST-DiT (time, height, width) patch over the latent."""
    num_actions: int = 18
    bf16: bool = True
    """bf16 autocast (GPU only, as in training)."""
    warmup: int = 5
    """Untimed steps first (they include compilation)."""
    steps: int = 20
    """Timed steps per setting."""
    peak_flops: float = PEAK_BF16_H100
    """Peak FLOP/s of the device for MFU (default: H100 SXM dense bf16). MFU is n/a on CPU."""
    device: str = "auto"
    profile: bool = False
    """Print a torch.profiler table of the top ops of two steps: synthetic mode, of the first setting
    of each compile mode (eager and compiled, which spend their time differently); pipeline mode,
    of the first setting."""
    out: str = ""
    """Write the rows here too: .csv, or JSON otherwise."""
    seed: int = 0
    # -- pipeline mode --
    data_root: str = ""
    """Collected episodes (`<data_root>/episodes/game=<G>/*.parquet`), pipeline mode."""
    game: str = ""
    """Game to read; empty = every game collected."""
    clip_stride: int = 2
    vae_path: str = ""
    """Trained VAE directory to encode with; empty = a randomly initialised `vae_preset` (same cost)."""
    vae_preset: str = "small"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"BenchTrainConfig.mode={self.mode!r}; expected one of {MODES}")
        bad = [p for p in self.presets if p not in STDiT_models]
        if bad:
            raise ValueError(f"BenchTrainConfig.presets: unknown {bad}; presets: {sorted(STDiT_models)}")
        bad = [c for c in self.compile if c not in COMPILE_MODES]
        if bad:
            raise ValueError(f"BenchTrainConfig.compile: unknown {bad}; expected {COMPILE_MODES}")
        if self.vae_preset not in VAE_models:
            raise ValueError(f"BenchTrainConfig.vae_preset={self.vae_preset!r}; presets: {sorted(VAE_models)}")
        if self.mode == "pipeline" and not self.data_root:
            raise ValueError("BenchTrainConfig: mode='pipeline' needs --data-root")
        if any(h < 1 or h > self.horizon for h in self.horizon_mix):
            raise ValueError(f"BenchTrainConfig.horizon_mix={self.horizon_mix}: each length must lie in "
                             f"1..horizon={self.horizon}")
        if self.horizon_mix and self.mode != "synthetic":
            raise ValueError("BenchTrainConfig.horizon_mix is for mode='synthetic'")

    def train_config(self, preset: str, batch_size: int, compiled: bool) -> TrainDiTConfig:
        return TrainDiTConfig(dit_preset=preset, n_cond=self.n_cond, horizon=self.horizon,
                              action_mode=self.action_mode, num_actions=self.num_actions, batch_size=batch_size,
                              bf16=self.bf16, compile=compiled, warmup_steps=1, seed=self.seed,
                              patch_size=tuple(self.patch_size))


class DiTStep:
    """The DiT job's optimiser step on given latents: loss under autocast, backward, clip, AdamW,
    EMA, as `workers.train_dit.train_loop_per_worker` runs it (without Ray, DDP or checkpoints)."""

    def __init__(self, tcfg: TrainDiTConfig, latent_channels: int, device: torch.device):
        self.tcfg, self.device = tcfg, device
        self.dit = build_dit(tcfg, latent_channels).to(device)
        self.ema = EMA(self.dit, tcfg.ema_decay)
        self.opt = make_optimizer(self.dit, tcfg)
        self.sched = make_scheduler(self.opt, tcfg)
        self.model = torch.compile(self.dit) if tcfg.compile else self.dit
        self.flow = RectifiedFlow(RectifiedFlowConfig(t_sampling=tcfg.t_sampling, logit_mean=tcfg.t_logit_mean,
                                                       action_dropout=tcfg.action_dropout))
        self.positions = {}  # action positions per number of action tokens, as train_dit computes per step
        self.log = JsonlLog(Path(os.devnull), active=False)
        self.skipped = skip_counter(self.opt, device)  # as the DiT job keeps it: no per-step host read
        self.step = 0
        self.last_loss: torch.Tensor | None = None

    def __call__(self, x0: torch.Tensor, lat_mask: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """x0: (B, T', C, h, w) scaled latents; lat_mask: (B, T') True = generated; actions: (B, A).
        Returns the loss, on the device: nothing here waits for it (`check` reads it after timing)."""
        A = actions.shape[1]
        if A not in self.positions:
            self.positions[A] = action_positions(A, self.tcfg.n_cond, self.tcfg.action_mode, device=self.device)
        with autocast(self.device, self.tcfg.bf16):
            loss = self.flow.loss(self.model, x0, lat_mask, actions=actions, action_positions=self.positions[A])
        ok, _ = optimizer_step(loss.float(), self.model, self.opt, self.sched, self.ema, self.tcfg, self.step, self.log,
                               self.skipped)
        if not ok:
            raise RuntimeError(f"non-finite loss/gradient at benchmark step {self.step}")
        self.step += 1
        self.last_loss = loss.detach()
        return self.last_loss

    def check(self) -> float:
        """After the timed steps: the last loss, or an error if any step's loss or gradient was not
        finite (its update skipped on the device)."""
        skipped = int(self.skipped.item()) if self.skipped is not None else 0
        last = float(self.last_loss) if self.last_loss is not None else math.nan
        if skipped or not math.isfinite(last):
            raise RuntimeError(f"non-finite loss/gradient in the benchmark ({skipped} step(s) skipped, last loss {last})")
        return last

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.dit.parameters())


def shape_vae(cfg: BenchTrainConfig) -> VideoVAE:
    """A VAE on the meta device: only its shape arithmetic (latent_frames, latent_hw,
    latent_frame_mask) is used, so the synthetic latents match what encoding would give."""
    with torch.device("meta"):
        return VAE_models["tiny"](spatial_downsample=cfg.spatial_downsample,
                                  temporal_downsample=cfg.temporal_downsample, latent_channels=cfg.latent_channels)


def step_flops(tcfg: TrainDiTConfig, latent_shape: tuple[int, ...], latent_channels: int,
               num_action_tokens: int = 0) -> int:
    """FLOPs of one forward + backward of the ST-DiT on a batch of latents (meta device, free).
    num_action_tokens: 0 = the config's."""
    B, T = latent_shape[:2]
    A = num_action_tokens or tcfg.num_action_tokens
    with torch.device("meta"):
        model = build_dit(tcfg, latent_channels)
        x, t = torch.empty(latent_shape), torch.empty(B)
        actions = torch.zeros(B, A, dtype=torch.long)
        mask = torch.ones(B, T, dtype=torch.bool)
        pos = action_positions(A, tcfg.n_cond, tcfg.action_mode, device="meta")
        return count_flops(lambda: model(x, t, actions=actions, frame_mask=mask, action_positions=pos).square().mean().backward())


def _peak_mem_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _settings(cfg: BenchTrainConfig):
    for preset in cfg.presets:
        for batch_size in cfg.batch_sizes:
            for mode in cfg.compile:
                yield preset, batch_size, mode == "compile"


def _oom_row(row: dict[str, Any], device: torch.device) -> dict[str, Any]:
    torch.cuda.empty_cache()
    return {**row, "note": "CUDA out of memory"}


def run_synthetic(cfg: BenchTrainConfig, device: torch.device) -> list[dict[str, Any]]:
    vae = shape_vae(cfg)
    horizons = cfg.horizon_mix or (cfg.horizon,)
    lengths = {T: cfg.n_cond + T for T in horizons}  # pixel frames per clip
    h, w = vae.latent_hw((cfg.height, cfg.width))
    shapes = "+".join(f"{vae.latent_frames(L)}" for L in lengths.values())
    rows, profiled = [], set()  # compile modes profiled so far
    for preset, B, compiled in _settings(cfg):
        tcfg = cfg.train_config(preset, B, compiled)
        row: dict[str, Any] = {"preset": preset, "compile": "compile" if compiled else "eager", "batch": B,
                               "latents": f"{shapes}x{cfg.latent_channels}x{h}x{w}"}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = DiTStep(tcfg, cfg.latent_channels, device)
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            inputs = []  # per generated length: (latents (B, T', C, h, w), latent mask (B, T'), actions (B, A))
            for T, L in lengths.items():
                frame_mask = torch.arange(L) >= cfg.n_cond  # (L,) True = generated
                x0 = torch.randn(B, vae.latent_frames(L), cfg.latent_channels, h, w, device=device, generator=g)
                lat_mask = vae.latent_frame_mask(frame_mask.expand(B, L)).to(device)
                A = tcfg.action_tokens(T)
                inputs.append((x0, lat_mask, torch.randint(0, cfg.num_actions, (B, A), device=device, generator=g)))
            turn = itertools.count()
            run = lambda: step(*inputs[next(turn) % len(inputs)])  # noqa: E731
            warmup_s = warm_up(run, device, max(cfg.warmup, len(inputs)))
            with GpuBusySampler(device) as busy:  # sampled over the timed steps only
                t = time_calls(run, device, cfg.steps)
            step.check()
        except torch.cuda.OutOfMemoryError:
            rows.append(_oom_row(row, device))
            continue
        flops = sum(step_flops(tcfg, tuple(x.shape), cfg.latent_channels, a.shape[1])
                    for x, _, a in inputs) / len(inputs)  # the mix's mean
        achieved = flops / t["mean_s"]
        row.update(params_M=step.params / 1e6, step_ms=1e3 * t["mean_s"], samples_per_s=B / t["mean_s"],
                   gflops_per_step=flops / 1e9, achieved_tflops=achieved / 1e12,
                   mfu_pct=100 * achieved / cfg.peak_flops if device.type == "cuda" else None,
                   gpu_busy_pct=busy.mean, peak_mem_GB=_peak_mem_gb(device), warmup_s=warmup_s)
        rows.append(row)
        if cfg.profile and row["compile"] not in profiled:
            print(f"\nprofile: {preset} batch {B} {row['compile']}\n{profile_table(run, device)}\n")
            profiled.add(row["compile"])
        del step, inputs
    return rows


# -- pipeline mode ---------------------------------------------------------------------------------
def episodes_path(data_root: str, game: str) -> str:
    """The dataset root, or one game's partition folder of it."""
    return os.path.join(data_root, "episodes", f"game={game}") if game else data_root


def window_dataset_from_parquet(cfg: BenchTrainConfig):
    """Training windows of n_cond + horizon frames from the train split, as the DiT job reads them."""
    from workers.clips import window_dataset

    ds = window_dataset(episodes_path(cfg.data_root, cfg.game), length=cfg.n_cond + cfg.horizon,
                        stride=cfg.clip_stride, split="train")
    return ds.select_columns(["frames", "actions"])


class FedStep:
    """uint8 windows -> device -> frozen VAE encode -> DiTStep, as the DiT job's loop body does;
    `next_batch` supplies the windows and the time spent waiting on it is accumulated."""

    def __init__(self, step: DiTStep, vae: VideoVAE, next_batch: Callable[[], dict[str, torch.Tensor]],
                 latent_scale: float = 1.0):
        self.step, self.vae, self.next_batch, self.latent_scale = step, vae, next_batch, latent_scale
        tcfg = step.tcfg
        self.L = tcfg.clip_length
        self.frame_mask = torch.arange(self.L, device=step.device) >= tcfg.n_cond  # (L,) True = generated
        self.wait_s = 0.0

    def __call__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = self.next_batch()
        self.wait_s += time.perf_counter() - t0
        device = self.step.device
        frames = batch["frames"].to(device, non_blocking=True)  # (B, L, H, W, 3) uint8
        if frames.shape[1] != self.L:
            raise ValueError(f"windows have {frames.shape[1]} frames, expected n_cond+horizon={self.L}")
        tcfg = self.step.tcfg
        _, _, actions = split_sample(frames, batch["actions"].to(device).long(), tcfg.n_cond, tcfg.horizon,
                                     tcfg.action_mode)  # (B, A)
        with torch.no_grad(), autocast(device, tcfg.bf16):
            mean, _ = self.vae.encode(pixels_to_model(frames))  # (B, T', C, h, w)
        x0 = mean.float() * self.latent_scale
        lat_mask = self.vae.latent_frame_mask(self.frame_mask.expand(frames.shape[0], self.L))  # (B, T')
        return self.step(x0, lat_mask, actions)


def run_pipeline(cfg: BenchTrainConfig, device: torch.device, dataset=None) -> list[dict[str, Any]]:
    """dataset: a Ray Dataset with columns frames uint8 (L, H, W, 3) and actions (L,); default: the
    Parquet episodes under cfg.data_root through workers.clips."""
    if dataset is None:
        import ray

        started = not ray.is_initialized()
        if started:
            init_ray()  # a local cluster, or the one RAY_ADDRESS names
        try:
            return run_pipeline(cfg, device, window_dataset_from_parquet(cfg))
        finally:
            if started:
                ray.shutdown()
    if cfg.vae_path:
        vae = load_vae(cfg.vae_path, device)
    else:
        vae = VAE_models[cfg.vae_preset](spatial_downsample=cfg.spatial_downsample,
                                         temporal_downsample=cfg.temporal_downsample,
                                         latent_channels=cfg.latent_channels).to(device).eval().requires_grad_(False)
    rows, profiled = [], not cfg.profile
    for preset, B, compiled in _settings(cfg):
        tcfg = cfg.train_config(preset, B, compiled)
        row: dict[str, Any] = {"preset": preset, "compile": "compile" if compiled else "eager", "batch": B}
        try:
            step = DiTStep(tcfg, vae.cfg.latent_channels, device)
            batches = infinite_batches(dataset, B, ("frames", "actions"))
            fed = FedStep(step, vae, lambda: next(batches))
            warmup_s = warm_up(fed, device, cfg.warmup)  # includes Ray Data's start-up
            fed.wait_s = 0.0
            with GpuBusySampler(device) as busy:
                t_fed = time_calls(fed, device, cfg.steps, latency_calls=0)  # wait_s: these steps alone
            wait_frac = fed.wait_s / (t_fed["mean_s"] * cfg.steps)
            # The same work on one batch resident on the device: the rate the input must sustain.
            resident = {k: v.to(device) for k, v in next(batches).items()}
            res = FedStep(step, vae, lambda: resident)
            warm_up(res, device, 1)
            t_res = time_calls(res, device, cfg.steps)
            step.check()
        except torch.cuda.OutOfMemoryError:
            rows.append(_oom_row(row, device))
            continue
        fed_rate, res_rate = B / t_fed["mean_s"], B / t_res["mean_s"]
        row.update(window=f"{tuple(resident['frames'].shape[1:])}", fed_samples_per_s=fed_rate,
                   resident_samples_per_s=res_rate, input_efficiency_pct=100 * fed_rate / res_rate,
                   data_wait_pct=100 * wait_frac, gpu_busy_pct=busy.mean,
                   input_bound=fed_rate < 0.9 * res_rate, warmup_s=warmup_s)
        rows.append(row)
        if not profiled:
            print(f"\nprofile (fed): {preset} batch {B} {row['compile']}\n{profile_table(fed, device)}\n")
            profiled = True
        del step, fed, res, resident
    return rows


SYNTHETIC_COLUMNS = ["preset", "params_M", "compile", "batch", "latents", "step_ms", "samples_per_s",
                     "gflops_per_step", "achieved_tflops", "mfu_pct", "gpu_busy_pct", "peak_mem_GB", "warmup_s", "note"]
PIPELINE_COLUMNS = ["preset", "compile", "batch", "window", "fed_samples_per_s", "resident_samples_per_s",
                    "input_efficiency_pct", "data_wait_pct", "gpu_busy_pct", "input_bound", "warmup_s", "note"]


def main(cfg: BenchTrainConfig, dataset=None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the device and a Markdown table, returns the rows.
    dataset (pipeline mode only): a Ray Dataset of windows to use instead of reading cfg.data_root."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    print(f"device: {device_name(device)}; torch {torch.__version__}; bf16 autocast "
          f"{'on' if cfg.bf16 and device.type == 'cuda' else 'off'}; mode {cfg.mode}")
    if cfg.mode == "synthetic":
        rows, columns = run_synthetic(cfg, device), SYNTHETIC_COLUMNS
    else:
        rows, columns = run_pipeline(cfg, device, dataset), PIPELINE_COLUMNS
    print(markdown_table(rows, [c for c in columns if c != "note" or any("note" in r for r in rows)]))
    if cfg.mode == "synthetic" and device.type == "cuda":
        print(f"MFU against a peak of {cfg.peak_flops / 1e12:,.0f} TFLOP/s (target >= 35%); GPU busy target >= 90%.")
    if cfg.out:
        print(f"wrote {write_rows(rows, cfg.out, {'device': device_name(device), 'config': repr(cfg)})}")
    return rows


if __name__ == "__main__":
    main(parse_config(BenchTrainConfig, description=__doc__))
