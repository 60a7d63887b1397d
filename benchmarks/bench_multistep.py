"""Multi-frame against single-step generation: error against horizon, and frames/s.

Two saved world models with the same backbone, one trained to generate T frames per chunk (e.g.
T=4) and one T=1 (same data, same training compute), roll out from the same held-out windows to
each horizon (4, 8, 16 by default) with `WorldModel.predict`'s chained chunks: the multi-frame
model takes ceil(h/T) chunks, the single-step model h. Both sample with the same number of Euler
steps per chunk. Every generated frame is scored against the truth at native resolution (MSE on
0-255, PSNR, LPIPS) by `workers.evaluate.score_windows`, beside the copy-last-frame baseline; a
horizon's score is the mean over its first h frames of one rollout to the longest horizon (as
evaluation does). frames/s is timed separately per horizon on one batch of windows.

The windows come from the `val` split (`--split`): the levers this benchmark weighs (T, Euler steps,
the horizon) are chosen on val, as every setting is; `test` is read by a run's final evaluation only.

    python -m benchmarks.bench_multistep --multi-frame runs/t4/world_model --single-step runs/t1/world_model \\
        --data-root /data/awm --game Breakout --out multistep.csv
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    GpuBusySampler, device_name, markdown_table, pick_device, profile_table, time_calls, warm_up,
    write_rows,
)
from pipeline.cli import parse_config
from pipeline.cluster import init_ray
from workers.evaluate import METRICS, horizon_table, score_windows, window_actions
from workers.schema import SPLITS
from workers.train_common import autocast
from workers.world_model import WorldModel, load_world_model


@dataclass(frozen=True)
class BenchMultistepConfig:
    multi_frame: str = ""
    """Saved world model generating several frames per chunk (e.g. T=4)."""
    single_step: str = ""
    """Saved world model generating one frame per chunk (T=1), same backbone; empty = the
    multi-frame model itself, rolled out one frame per chunk (it must be trained for T=1 too,
    see TrainDiTConfig.horizon_choices)."""
    multi_chunk: int = 0
    """Frames per chunk of the multi-frame model; 0 = its longest trained length."""
    data_root: str = ""
    """Collected episodes; held-out windows come from their `split`."""
    split: str = field(default="val", metadata={"choices": SPLITS})
    """Split of the held-out windows: val, where settings are chosen (test is read by a run's final
    evaluation only)."""
    game: str = ""
    """Game to read; empty = every game collected."""
    horizons: tuple[int, ...] = (4, 8, 16)
    sample_steps: int = 0
    """Euler steps per chunk for both models; 0 = the multi-frame model's saved setting."""
    max_windows: int = 64
    """Held-out windows scored."""
    stride: int = 16
    """Stride of the windows within each held-out episode."""
    batch_size: int = 16
    """Windows per predict call, for scoring and for timing."""
    lpips: bool = True
    """Score LPIPS too (needs the weights of scripts/setup_lpips.py)."""
    bf16: bool = False
    """bf16 autocast around predict (GPU only); off by default, as evaluation runs."""
    timing_iters: int = 3
    """Timed rollouts per model and horizon (after one warmup rollout)."""
    device: str = "auto"
    profile: bool = False
    """Print a torch.profiler table of one longest-horizon rollout of each model."""
    out: str = ""
    """Write the rows here too: .csv, or JSON otherwise."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"BenchMultistepConfig.split={self.split!r}; splits are {list(SPLITS)}")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"BenchMultistepConfig.horizons={self.horizons}: need positive horizons")
        if self.batch_size < 1 or self.max_windows < 1:
            raise ValueError("BenchMultistepConfig: batch_size and max_windows must be >= 1")


def read_windows(cfg: BenchMultistepConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """max_windows held-out windows of `length` frames, spread evenly over cfg.split's windows
    (by episode, then start): frames uint8 (N, L, H, W, 3), actions (N, L)."""
    import ray

    from benchmarks.bench_train import episodes_path
    from workers.clips import read_windows_numpy

    started = not ray.is_initialized()
    if started:
        init_ray()
    try:
        w = read_windows_numpy(episodes_path(cfg.data_root, cfg.game), length, cfg.stride, split=cfg.split,
                               max_windows=cfg.max_windows)
    finally:
        if started:
            ray.shutdown()
    if len(w["frames"]) == 0:
        raise ValueError(f"no {cfg.split} windows of {length} frames under {cfg.data_root} (game {cfg.game or 'any'})")
    return w["frames"], w["actions"]


def _check_windows(frames: np.ndarray, actions: np.ndarray, length: int) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3 or frames.shape[1] < length:
        raise ValueError(f"windows: frames must be uint8 (N, L>={length}, H, W, 3), got {frames.dtype} {frames.shape}")
    if actions.shape[:2] != frames.shape[:2]:
        raise ValueError(f"windows: actions {actions.shape} do not match frames {frames.shape[:2]} (N, L)")


def score_model(wm: WorldModel, frames: torch.Tensor, actions: torch.Tensor, horizon: int, cfg: BenchMultistepConfig,
                lpips_model, device: torch.device) -> dict[str, np.ndarray]:
    """Per-window per-frame scores of one model over all windows, batch by batch."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    parts: list[dict[str, np.ndarray]] = []
    for i in range(0, len(frames), cfg.batch_size):
        with autocast(device, cfg.bf16):
            scores, _ = score_windows(wm, frames[i: i + cfg.batch_size], actions[i: i + cfg.batch_size], horizon,
                                      lpips_model, gen)
        parts.append(scores)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def time_rollout(wm: WorldModel, frames: torch.Tensor, actions: torch.Tensor, horizon: int,
                 cfg: BenchMultistepConfig, device: torch.device) -> tuple[float, float | None]:
    """(frames/s, GPU busy %) of rollouts to `horizon` on one batch of windows."""
    n = wm.n_cond
    cond = frames[: cfg.batch_size, :n]
    acts = window_actions(actions[: cfg.batch_size], n, horizon, wm.action_mode)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def call() -> torch.Tensor:
        with autocast(device, cfg.bf16):
            return wm.predict(cond, acts, horizon, generator=gen)

    warm_up(call, device, 1)
    with GpuBusySampler(device) as busy:
        t = time_calls(call, device, cfg.timing_iters)
    return len(cond) * horizon / t["mean_s"], busy.mean


def main(cfg: BenchMultistepConfig, windows: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Runs the comparison, prints the device, a Markdown table and the verdict, returns the rows.
    windows: (frames uint8 (N, L, H, W, 3), actions (N, L)) to use instead of reading cfg.data_root;
    L must be at least max(n_cond) + max(horizons)."""
    if not cfg.multi_frame:
        raise ValueError("BenchMultistepConfig needs --multi-frame (and --single-step, unless the "
                         "multi-frame model was trained for T=1 too) world-model directories")
    device = pick_device(cfg.device)
    multi = load_world_model(cfg.multi_frame, device)
    steps = cfg.sample_steps or multi.sampler.cfg.num_steps
    multi = load_world_model(cfg.multi_frame, device, sample_steps=steps)
    multi.chunk = cfg.multi_chunk or multi.horizon
    single = load_world_model(cfg.single_step or cfg.multi_frame, device, sample_steps=steps)
    single.chunk = 1 if 1 in single.trained_horizons else None
    if single.chunk != 1 and single.horizon != 1:
        print(f"warning: the single-step model generates {single.horizon} frames per chunk, not 1")
    models = {f"multi-frame T={multi.chunk}": multi, f"single-step T={single.chunk or single.horizon}": single}
    H, n_max = max(cfg.horizons), max(multi.n_cond, single.n_cond)
    L = n_max + H
    frames_np, actions_np = windows if windows is not None else read_windows(cfg, L)
    _check_windows(frames_np, actions_np, L)
    frames_np, actions_np = frames_np[: cfg.max_windows], actions_np[: cfg.max_windows]
    print(f"device: {device_name(device)}; torch {torch.__version__}; bf16 autocast "
          f"{'on' if cfg.bf16 and device.type == 'cuda' else 'off'}; {steps} Euler steps per chunk; "
          f"{len(frames_np)} windows of {frames_np.shape[2]}x{frames_np.shape[3]}")
    lpips_model = None
    if cfg.lpips:
        from models.lpips import LPIPS

        lpips_model = LPIPS().to(device)

    rows: list[dict[str, Any]] = []
    copy_last: dict[str, np.ndarray] = {}
    for name, wm in models.items():
        # Align the truth across models: each takes its own last n_cond frames before index n_max.
        frames = torch.from_numpy(np.ascontiguousarray(frames_np[:, n_max - wm.n_cond: n_max + H]))
        actions = torch.from_numpy(np.ascontiguousarray(actions_np[:, n_max - wm.n_cond: n_max + H])).long()
        scores = score_model(wm, frames, actions, H, cfg, lpips_model, device)
        copy_last = copy_last or scores  # copy-last scores are the same frames whichever model ran
        table = {r["generation_length"]: r for r in horizon_table(scores, tuple(cfg.horizons)) if r["method"] == "model"}
        for h in cfg.horizons:
            fps, busy = time_rollout(wm, frames, actions, h, cfg, device)
            row = {"method": name, "horizon": h, "chunks": -(-h // (wm.chunk or wm.horizon)), "sample_steps": steps,
                   "frames_per_s": fps, "gpu_busy_pct": busy}
            row.update({k: v for k, v in table[h].items() if k not in ("method", "generation_length")})
            rows.append(row)
        if cfg.profile:
            cond = frames[: cfg.batch_size, : wm.n_cond]
            acts = window_actions(actions[: cfg.batch_size], wm.n_cond, H, wm.action_mode)

            def rollout(wm=wm, cond=cond, acts=acts) -> torch.Tensor:
                with autocast(device, cfg.bf16):
                    return wm.predict(cond, acts, H)

            print(f"\nprofile: {name}, horizon {H}\n{profile_table(rollout, device, calls=1)}\n")
    for r in horizon_table(copy_last, tuple(cfg.horizons)):
        if r["method"] == "copy_last":
            rows.append({"method": "copy-last", "horizon": r["generation_length"],
                         **{k: v for k, v in r.items() if k not in ("method", "generation_length")}})

    metrics = [m for m in METRICS if m in rows[0]]
    columns = ["method", "horizon", "chunks", "sample_steps", "frames_per_s", "gpu_busy_pct"]
    for m in metrics:
        columns += [m, f"{m}_std"]
    print(markdown_table(rows, columns + ["psnr_of_mean_mse", "num_windows"]))
    bounds = {h: frame_bound(h, multi.n_cond, multi.chunk or multi.horizon, single.n_cond,
                             single.chunk or single.horizon) for h in cfg.horizons}
    for line in verdict(rows, *models, metrics, bounds):
        print(line)
    if cfg.out:
        print(f"wrote {write_rows(rows, cfg.out, {'device': device_name(device), 'config': repr(cfg)})}")
    return rows


def frame_bound(horizon: int, n_multi: int, chunk_multi: int, n_single: int, chunk_single: int) -> float:
    """The speedup of the multi-frame rollout over the single-step one if each DiT call cost in
    proportion to the latent frames it processes (its n_cond condition frames plus its chunk):
    multi-frame amortises the condition frames over a chunk, which is all it saves per generated
    frame. Every generated frame is decoded either way, so the real speedup is at most this.
    With 4 condition frames and chunks of 4 against 1 it is 4 * 5 / 8 = 2.5; a 3x speedup needs
    n_cond >= 8 (T (n + 1) / (n + T) >= 3 with T = 4)."""
    calls_multi, calls_single = -(-horizon // chunk_multi), -(-horizon // chunk_single)
    return calls_single * (n_single + chunk_single) / (calls_multi * (n_multi + chunk_multi))


def verdict(rows: list[dict[str, Any]], multi: str, single: str, metrics: list[str],
            bounds: dict[int, float] | None = None) -> list[str]:
    """The target, checked: multi-frame >= 3x the frames/s of single-step at equal sampling
    steps, and no worse on any metric at any horizon (lower MSE/LPIPS, higher PSNR is better).
    bounds: per horizon, the speedup `frame_bound` allows, printed beside the measured one."""
    by = {(r["method"], r["horizon"]): r for r in rows}
    lines = []
    for h in sorted({r["horizon"] for r in rows if r["method"] == multi}):
        a, b = by[(multi, h)], by[(single, h)]
        speedup = a["frames_per_s"] / b["frames_per_s"]
        worse = [m for m in metrics if (a[m] < b[m] if m == "psnr" else a[m] > b[m])]
        bound = f" of at most {bounds[h]:.2f}x by frames processed" if bounds and h in bounds else ""
        lines.append(f"horizon {h}: {multi} is {speedup:.2f}x{bound} the frames/s of {single} "
                     f"({'meets' if speedup >= 3 else 'misses'} the 3x target); error "
                     + (f"worse on {', '.join(worse)}" if worse else "no worse on any metric"))
    return lines


if __name__ == "__main__":
    main(parse_config(BenchMultistepConfig, description=__doc__))
