"""DDP scaling of the DiT job: the pipeline's own DiT stage (Ray Train, DDP) with 1, 2, 4, ...
workers on the same data and VAE; samples/s, scaling efficiency against one worker, and the loss
at equal samples seen.

Each worker count is a real `pipeline/run_all.py --stages dit` run in `<run-dir>/w<n>`, on the data
and VAE of `<run-dir>/base` (made first with `--stages collect vae` when absent, as the preset has
them), for the same `--max-train-s`:

    python -m benchmarks.bench_ddp --run-dir /tmp/ddp --preset gpu --game Breakout --workers 1 2 --max-train-s 240
    python -m benchmarks.bench_ddp --run-dir /tmp/ddp --preset smoke --game Pong --workers 1 2 --steps 40   # CPU, gloo

Weak scaling (default): every worker keeps the preset's batch, so the global batch grows with the
workers. Strong scaling (`--global-batch N`): the workers split N clips a step, so every run takes
the same optimiser steps over the same number of samples, and their loss curves should match at
equal samples seen. On GPUs, NCCL runs with NVLink multicast off (NCCL_NVLS_ENABLE=0).

samples/s = clips a step (all workers) x steps/s, from the logged steps after the first (its
interval holds the start-up). Efficiency = samples/s / (n x one worker's). The loss at a number of
samples seen is the mean of the logged losses (each the mean over the ranks) within 10 % of it.
The learning-rate cooldown is switched off (it follows the time budget, which would give each run
a different schedule).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_rows
from pipeline.cli import parse_config

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchDDPConfig:
    run_dir: str = "/tmp/bench_ddp"
    """Holds base/ (the collection and VAE every run shares) and w<n>/ (one DiT run per worker count)."""
    preset: str = "smoke"
    """run_all.py preset: the DiT settings of every run, and how base/ is made."""
    game: str = "Breakout"
    workers: tuple[int, ...] = (1, 2)
    max_train_s: float = 0.0
    """Time budget of each DiT run (0 = the preset's step count or --steps)."""
    steps: int = 0
    """Steps of each DiT run (0 = the preset's)."""
    global_batch: int = 0
    """0 = weak scaling (each worker the preset's batch); N = strong scaling: N clips a step in all,
    N / n a worker (N must divide by every worker count)."""
    use_gpu: bool = False
    """One GPU a worker (NCCL); off: CPU workers (gloo)."""
    sets: tuple[str, ...] = ()
    """More `section.field=value` settings for every DiT run (run_all.py --set)."""
    out: str = ""
    """Write the rows here (.csv or .json); empty = print only."""


def _run_all(cfg: BenchDDPConfig, out: Path, stages: list[str], sets: list[str], log: Path) -> None:
    cmd = [sys.executable, str(REPO / "pipeline" / "run_all.py"), "--preset", cfg.preset, "--games", cfg.game,
           "--out", str(out), "--stages", *stages]
    if sets:
        cmd += ["--set", *sets]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"bench_ddp: {' '.join(cmd)} exited {rc}; its log: {log}")


def prepare_base(cfg: BenchDDPConfig) -> Path:
    """base/: the collection and the VAE every DiT run trains on (made once, kept for reruns)."""
    base = Path(cfg.run_dir) / "base"
    if not (base / "stages" / "vae.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        _run_all(cfg, base, ["collect", "vae"], [], Path(cfg.run_dir) / "base.log")
    return base


def dit_settings(cfg: BenchDDPConfig, n: int) -> list[str]:
    """The --set list of the run with n workers."""
    sets = [f"dit.num_workers={n}", f"dit.use_gpu={json.dumps(cfg.use_gpu)}", "dit.lr_cooldown=0", "dit.snapshot_s=[]"]
    if cfg.global_batch:
        if cfg.global_batch % n:
            raise ValueError(f"BenchDDPConfig.global_batch={cfg.global_batch} does not divide by {n} workers")
        sets.append(f"dit.batch_size={cfg.global_batch // n}")
    if cfg.max_train_s:
        sets.append(f"dit.max_train_s={cfg.max_train_s}")
    if cfg.steps:
        sets.append(f"dit.steps={cfg.steps}")
    return sets + list(cfg.sets)


def run_workers(cfg: BenchDDPConfig, base: Path, n: int) -> Path:
    """One DiT run with n workers in w<n>/, on base/'s data and VAE (a rerun replaces it)."""
    run = Path(cfg.run_dir) / f"w{n}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "stages").mkdir(parents=True)
    (run / "data").symlink_to((base / "data").resolve())
    for stage in ("collect", "vae"):
        shutil.copy(base / "stages" / f"{stage}.json", run / "stages")
    _run_all(cfg, run, ["dit"], dit_settings(cfg, n), Path(cfg.run_dir) / f"w{n}.log")
    return run


def read_metrics(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the start event, the logged step rows) of a DiT job's metrics JSONL
    (`workers.train_common.read_metrics`: a restarted run's re-logged steps counted once)."""
    from workers.train_common import read_metrics as read_jsonl

    recs = read_jsonl(path)
    start = next((r for r in recs if r.get("event") == "start"), {})
    rows = [r for r in recs if "event" not in r and "train/loss" in r]
    if len(rows) < 2:
        raise ValueError(f"{path}: {len(rows)} logged steps; the rate needs at least 2 (log_every too large for the run?)")
    return start, rows


def summarise(runs: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]], batch_of: dict[int, int],
              at_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)) -> list[dict[str, Any]]:
    """One row per worker count: steps, samples/s, efficiency against the fewest workers (scaled
    to one), and the loss at shared numbers of samples seen (fractions of the fewest any run saw)."""
    rates, seen = {}, {}
    for n, (_, rows) in runs.items():
        clips = batch_of[n] * n
        first, last = rows[0], rows[-1]
        rates[n] = clips * (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)
        seen[n] = [(r["step"] * clips, r["train/loss"]) for r in rows]
    n0 = min(runs)
    horizon = min(s[-1][0] for s in seen.values())
    out = []
    for n, (start, rows) in sorted(runs.items()):
        row = {"workers": n, "world_size": start.get("world_size", n), "batch_per_worker": batch_of[n],
               "global_batch": batch_of[n] * n, "steps": rows[-1]["step"], "samples_per_s": rates[n],
               "efficiency_pct": 100 * rates[n] / (rates[n0] * n / n0)}
        for f in at_fractions:
            target = f * horizon
            near = [loss for s, loss in seen[n] if abs(s - target) <= 0.1 * target]
            row[f"loss_at_{int(target):d}"] = sum(near) / len(near) if near else None
        out.append(row)
    return out


def main(cfg: BenchDDPConfig) -> list[dict[str, Any]]:
    from pipeline.presets import PRESETS
    from workers.train_common import metrics_path

    preset_batch = PRESETS[cfg.preset]().dit["batch_size"]
    base = prepare_base(cfg)
    runs, batch_of = {}, {}
    for n in cfg.workers:
        run = run_workers(cfg, base, n)
        runs[n] = read_metrics(metrics_path(run, f"dit-{cfg.game}"))
        batch_of[n] = cfg.global_batch // n if cfg.global_batch else preset_batch
        print(f"[bench_ddp] {n} worker(s): {runs[n][1][-1]['step']} steps", flush=True)
    rows = summarise(runs, batch_of)
    cols = list(rows[0])
    print(markdown_table(rows, cols))
    print(f"{cfg.preset} preset, {cfg.game}; {'GPU workers, NCCL' if cfg.use_gpu else 'CPU workers, gloo'}; "
          f"{'strong scaling, global batch ' + str(cfg.global_batch) if cfg.global_batch else 'weak scaling'}")
    if cfg.out:
        write_rows(rows, cfg.out, meta={"config": cfg.__dict__})
    return rows


if __name__ == "__main__":
    main(parse_config(BenchDDPConfig, description=__doc__))
