"""How much an Atari game's frames change per step: the copy-last baseline's MSE on raw ALE play,
by game and frame skip, beside the paper's Table 2 MSE.

Plays `--frames` steps of each game with random actions (full 210x160 RGB, sticky actions off) at
each frame skip of `--frameskips` (emulator frames per step; the pipeline records at 4, the v5
default), then scores copy-last as the evaluation does: for every window of `T` future frames
inside one episode, the mean squared error (pixel levels 0-255) of each future frame against the
last condition frame, averaged over the T frames and then over the windows.

No model can score below the error it makes on what the condition frames do not determine, and
copy-last bounds how much there is to predict: a game whose frames differ by hundreds of MSE a
step leaves a world model far more to get right than one near the paper's few MSE.

    python -m benchmarks.probe_copy_last --games DemonAttack Breakout --frameskips 4 1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.common import markdown_table, write_rows
from pipeline.cli import parse_config
from benchmarks.probe_vae_grid import play_episodes
from pipeline.paper import PAPER


@dataclass(frozen=True)
class ProbeCopyLastConfig:
    games: tuple[str, ...] = ("Breakout", "Pong", "DemonAttack")
    """ALE games (short names or ALE/<Game>-v5 ids)."""
    frameskips: tuple[int, ...] = (4, 1)
    """Emulator frames per step to compare (4: what the pipeline records)."""
    frames: int = 4000
    """Steps played per game and frame skip, with random actions."""
    horizons: tuple[int, ...] = (1, 2, 4)
    """Generated lengths T scored."""
    seed: int = 0
    out: str = ""
    """CSV of the table (optional)."""


def copy_last_mse(frames: np.ndarray, episode: np.ndarray, horizon: int) -> tuple[float, float, int]:
    """Copy-last's mean and median window MSE at generated length `horizon` over every window whose
    last condition frame and `horizon` future frames lie in one episode, and the number of windows."""
    n = len(frames) - horizon
    if n < 1:
        return float("nan"), float("nan"), 0
    err = np.zeros(n, dtype=np.float64)
    for s in range(0, n, 512):  # blocks of windows: float32 copies of 512 frames, not of the whole play
        e = min(n, s + 512)
        last = frames[s:e].astype(np.float32)
        for t in range(1, horizon + 1):
            err[s:e] += ((frames[s + t:e + t].astype(np.float32) - last) ** 2).mean(axis=(1, 2, 3))
    keep = episode[horizon:horizon + n] == episode[:n]
    err = err[keep] / horizon
    return (float(err.mean()), float(np.median(err)), int(keep.sum())) if keep.any() else (float("nan"), float("nan"), 0)


def main(cfg: ProbeCopyLastConfig) -> list[dict]:
    if cfg.frames < 2 or min(cfg.frameskips, default=1) < 1 or min(cfg.horizons, default=1) < 1:
        raise ValueError(f"ProbeCopyLastConfig: frames={cfg.frames} must be >= 2, frameskips={cfg.frameskips} "
                         f"and horizons={cfg.horizons} >= 1")
    rows = []
    for game in cfg.games:
        for skip in cfg.frameskips:
            frames, episode = play_episodes(game, cfg.frames, cfg.seed, frameskip=skip)
            for horizon in cfg.horizons:
                mean, median, windows = copy_last_mse(frames, episode, horizon)
                paper = PAPER.get((game, "future", "embedding", horizon))
                rows.append({"game": game, "frameskip": skip, "T": horizon, "windows": windows,
                             "copy_last_mse": mean, "copy_last_median": median,
                             "paper_model_mse": paper[0] if paper else None})
    print(markdown_table(rows, list(rows[0])), flush=True)
    if cfg.out:
        write_rows(rows, cfg.out, meta={"config": cfg.__dict__})
    return rows


if __name__ == "__main__":
    main(parse_config(ProbeCopyLastConfig, description=__doc__))
