"""benchmarks/vae_floor.py: the VAE's reconstruction error by split and by the way the VAE is run,
on a real collected dataset (Parquet through Ray Data) and real (tiny, untrained) VAE weights laid
out as a pipeline run leaves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import vae_floor
from models.vae import VAE_models
from workers.clips import read_windows_numpy
from models.pixels import model_to_pixels, pixels_to_model
from workers.world_model import save_vae

def _run_dir(tmp_path: Path, data_root: str, with_checkpoint: bool) -> tuple[Path, torch.nn.Module]:
    """A run as the pipeline leaves it: data/, models/vae (the exported EMA weights) and, when
    asked, train/vae/checkpoint_*/state.pt whose raw weights differ from the EMA's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(data_root)
    torch.manual_seed(0)
    ema = VAE_models["tiny"]().eval()
    save_vae(run / "models" / "vae", ema)
    if with_checkpoint:
        raw = VAE_models["tiny"]()
        with torch.no_grad():
            for p in raw.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ckpt = run / "train" / "vae" / "checkpoint_000001"
        ckpt.mkdir(parents=True)
        torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "step": 30}, ckpt / "state.pt")
    return run, ema


def test_vae_floor_scores_each_split_and_weights_against_the_true_frames(tiny_split_root, tmp_path):
    run, ema = _run_dir(tmp_path, tiny_split_root, with_checkpoint=True)
    out = tmp_path / "floor.csv"
    df = vae_floor.main(["--run-dir", str(run), "--windows", "3", "--length", "4", "--stride", "8", "--device", "cpu",
                   "--out", str(out)])
    assert out.exists() and len(pd.read_csv(out)) == len(df)
    # CPU: fp32 only; 3 weights x 2 latents per split, training and val windows (never test) by default
    assert sorted(df.split.unique()) == ["train", "val"] and len(df) == 2 * 3 * 2
    assert set(df.precision) == {"fp32"} and set(df.latent) == {"mean", "sample"}
    row = {(r.split, r.weights, r.latent): r for r in df.itertuples()}
    for split in ("train", "val"):
        # the checkpoint's EMA is the exported model: the same numbers; its raw weights differ
        exp, ck = row[(split, "exported (EMA)", "mean")], row[(split, "last checkpoint, EMA (step 30)", "mean")]
        assert ck.mse_0_255 == pytest.approx(exp.mse_0_255, rel=1e-6)
        assert row[(split, "last checkpoint, raw (step 30)", "mean")].mse_0_255 != pytest.approx(exp.mse_0_255, rel=1e-3)
        # independently: the exported VAE's posterior mean, decoded, against the split's frames
        w = read_windows_numpy(tiny_split_root, 4, 8, split, max_windows=3)
        frames = torch.from_numpy(w["frames"])
        with torch.no_grad():
            mean, _ = ema.encode(pixels_to_model(frames))
            rec = ema.decode(mean, 4, (210, 160))
        want = ((model_to_pixels(rec).double() - frames.double()) ** 2).mean().item()
        assert exp.mse_0_255 == pytest.approx(want, rel=1e-5)
        assert exp.windows == len(frames) == 3
        want_l2 = ((rec.double() - pixels_to_model(frames).double()) ** 2).mean().item() * 127.5 ** 2
        assert exp.train_loss_scale == pytest.approx(want_l2, rel=1e-4)


def test_vae_floor_without_checkpoints_scores_the_exported_vae_alone(tiny_split_root, tmp_path):
    run, _ = _run_dir(tmp_path, tiny_split_root, with_checkpoint=False)
    df = vae_floor.main(["--run-dir", str(run), "--windows", "2", "--device", "cpu", "--splits", "test"])
    assert set(df.weights) == {"exported (EMA)"} and len(df) == 2 and set(df.split) == {"test"}


def test_vae_floor_names_a_split_without_windows(tiny_dataset, tmp_path):
    """Two-split data has no val windows: the error says which split and where."""
    run, _ = _run_dir(tmp_path, tiny_dataset.root, with_checkpoint=False)
    with pytest.raises(SystemExit, match="no val windows"):
        vae_floor.main(["--run-dir", str(run), "--windows", "2", "--device", "cpu", "--splits", "val"])
