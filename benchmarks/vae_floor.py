"""The VAE's reconstruction error (the floor of any model on its latents) on training and held-out
windows of the same run, under each way the pipeline runs the VAE, to tell a generalisation gap
from a difference between training and evaluation:

- weights: the exported VAE (`models/vae`, the EMA weights that the DiT and the evaluation use)
  and the raw weights of the run's last checkpoint (what `train/recon` is measured on);
- precision: float32 (the evaluation) and bf16 autocast (training, on a GPU);
- latent: the posterior mean (evaluation, DiT latents) and a posterior sample (training).

MSE on 0-255 pixel values of the uint8 output (as the evaluation scores it) and the training loss's
L2 on the [-1, 1] scale x 127.5^2 (as `train/recon` is logged), per split. One table, and a CSV:

    python -m benchmarks.vae_floor --run-dir runs/gpu --windows 64 --device cuda --out floor.csv
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import device_name, write_rows
from pipeline.cli import parse_config
from workers.clips import read_windows_numpy
from workers.train_common import train_dir
from workers.train_vae import mean_reconstruction_error
from workers.world_model import load_vae


@dataclass(frozen=True)
class VaeFloorConfig:
    run_dir: str
    """A pipeline run of one game (data/, models/vae, train/vae/checkpoint_*)."""
    windows: int = 64
    """Windows per split, spread over its episodes."""
    length: int = 4
    """Frames per window."""
    stride: int = 8
    """Steps between window starts."""
    batch: int = 16
    """Windows per VAE call."""
    device: str = "auto"
    """cuda when present, else cpu (auto), or a torch device."""
    splits: tuple[str, ...] = ("train", "val")
    """Splits scored: training windows beside held-out ones (val: test is for a run's final evaluation)."""
    out: str = ""
    """CSV of the table (with its .meta.json beside it); empty = printed only."""


def last_checkpoint_state(run_dir: Path, name: str = "vae") -> dict | None:
    """The raw and EMA state dicts of the run's newest VAE training checkpoint (Ray Train's
    `<run>/train/<name>/checkpoint_*/state.pt`); None when the run kept none."""
    found = sorted(train_dir(run_dir, name).glob("checkpoint_*/state.pt"))
    return torch.load(found[-1], map_location="cpu", weights_only=False) if found else None


def floor(vae, frames: np.ndarray, device: str, bf16: bool, sample: bool, batch: int, seed: int = 0) -> dict:
    """Mean reconstruction error of `frames` (uint8 (N, L, H, W, 3)): MSE of the uint8 output on
    0-255 values, and the L2 of the float output on [-1, 1] x 127.5^2 (the training loss's scale)."""
    g = torch.Generator(device=device).manual_seed(seed)
    on_pixels, l2 = mean_reconstruction_error(vae, torch.from_numpy(frames).to(device), bf16, sample, g, batch)
    return {"mse_0_255": on_pixels, "train_loss_scale": l2}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    a = parse_config(VaeFloorConfig, argv, description=__doc__)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    run = Path(a.run_dir)
    exported = load_vae(run / "models" / "vae", device).eval()
    variants = [("exported (EMA)", exported)]
    state = last_checkpoint_state(run)
    if state is not None:
        for key, label in (("model", "last checkpoint, raw"), ("ema", "last checkpoint, EMA")):
            m = load_vae(run / "models" / "vae", device).eval()
            m.load_state_dict(state[key])
            variants.append((f"{label} (step {state['step']})", m))
    rows = []
    for split in a.splits:
        w = read_windows_numpy(str(run / "data"), a.length, a.stride, split, max_windows=a.windows)
        if len(w["frames"]) == 0:
            raise SystemExit(f"vae_floor: no {split} windows of {a.length} frames under {run / 'data'}")
        for name, vae in variants:
            for bf16 in ((False, True) if device.startswith("cuda") else (False,)):
                for sample in (False, True):
                    r = floor(vae, w["frames"], device, bf16, sample, a.batch)
                    rows.append({"split": split, "windows": len(w["frames"]), "weights": name,
                                 "precision": "bf16" if bf16 else "fp32", "latent": "sample" if sample else "mean", **r})
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if a.out:
        write_rows(df.to_dict("records"), a.out, {"device": device_name(torch.device(device)), "config": repr(a)})
    return df


if __name__ == "__main__":
    main()
