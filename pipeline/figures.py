"""Figures of an evaluation: frame strips, action/inertia strips, rollout GIFs, metric-vs-horizon plots.

Every function takes uint8 frames (T, 210, 160, 3) as numpy arrays and returns a matplotlib Figure
(or writes a GIF), so that pipeline/evaluate.py can hand the result to pipeline/tracking.py.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # drivers run headless
import imageio.v2 as imageio  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COND_EDGE, GEN_EDGE, TRUE_EDGE = "#1f77b4", "#d62728", "#2ca02c"


def _row(axes, frames: np.ndarray, colors: list[str], titles: list[str]) -> None:
    for ax, frame, color, title in zip(axes, frames, colors, titles):
        ax.imshow(frame, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2.5)
        ax.set_title(title, fontsize=7)


def frame_strip(cond: np.ndarray, generated: np.ndarray, truth: np.ndarray, title: str = "") -> Figure:
    """Two rows like the paper's Figure 1: condition | generated, and condition | ground truth.

    cond: (n, H, W, 3); generated, truth: (T, H, W, 3)."""
    n, T = len(cond), len(generated)
    fig, axes = plt.subplots(2, n + T, figsize=(1.1 * (n + T), 3.2), squeeze=False)
    for r, (label, future, color) in enumerate((("generated", generated, GEN_EDGE), ("truth", truth, TRUE_EDGE))):
        _row(axes[r], np.concatenate([cond, future]), [COND_EDGE] * n + [color] * T,
             [f"cond {i + 1}" for i in range(n)] + [f"{label} {k + 1}" for k in range(T)])
    fig.suptitle(title or "condition (blue) | generated (red) / truth (green)", fontsize=9)
    fig.tight_layout()
    return fig


def action_strips(cond: np.ndarray, rollouts: dict[str, np.ndarray], title: str = "",
                  frame_actions: dict[str, list[str]] | None = None) -> Figure:
    """Figures 3-5: the same condition frames, one row per action sequence (row label = its key; each
    generated frame is titled with its action: `frame_actions[key][k]`, else the key's k-th character)."""
    n = len(cond)
    T = max(len(v) for v in rollouts.values())
    fig, axes = plt.subplots(len(rollouts), n + T, figsize=(1.1 * (n + T), 1.6 * len(rollouts)), squeeze=False)
    for r, (label, gen) in enumerate(rollouts.items()):
        _row(axes[r], np.concatenate([cond, gen]), [COND_EDGE] * n + [GEN_EDGE] * len(gen),
             [f"cond {i + 1}" for i in range(n)]
             + [f"a={acts[k] if k < len(acts) else '?'}" for k in range(len(gen))
                for acts in [(frame_actions or {}).get(label, label)]])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle(title or "same condition, different actions", fontsize=9)
    fig.tight_layout()
    return fig


def rollout_gif(path: str | Path, generated: np.ndarray, truth: np.ndarray | None = None,
                cond: np.ndarray | None = None, fps: int = 4) -> Path:
    """An animated GIF: condition frames then the rollout; generated beside truth when given."""
    frames = generated if truth is None else np.concatenate([generated, truth], axis=2)  # side by side
    if cond is not None:
        lead = cond if truth is None else np.concatenate([cond, cond], axis=2)
        frames = np.concatenate([lead, frames])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)
    return path


def metric_vs_horizon(per_frame: pd.DataFrame, metric: str, title: str = "") -> Figure:
    """One metric against the generated frame index, model vs copy-last (one line per game/method).

    per_frame: rows with columns game, method, frame, <metric>, <metric>_std."""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for (game, method), df in per_frame.groupby(["game", "method"], sort=True):
        df = df.sort_values("frame")
        style = "-o" if method == "model" else "--s"
        ax.plot(df["frame"], df[metric], style, label=f"{game} {method}", markersize=3)
        if f"{metric}_std" in df:
            ax.fill_between(df["frame"], df[metric] - df[f"{metric}_std"], df[metric] + df[f"{metric}_std"], alpha=0.15)
    ax.set_xlabel("generated frame")
    ax.set_ylabel({"mse": "MSE (0-255)", "psnr": "PSNR (dB)", "lpips": "LPIPS (AlexNet, 210x160)"}.get(metric, metric))
    ax.set_title(title or f"{metric} vs horizon", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
