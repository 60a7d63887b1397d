"""Metrics: hand-computable MSE/PSNR, copy-last, and LPIPS against published reference values."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.lpips import LPIPS, weights_path
from models.metrics import copy_last_prediction, lpips_frames, mse_255, psnr, score_frames

REF_DIR = Path(__file__).parent / "data" / "lpips_ref"
# Official LPIPS (AlexNet, v0.1) distances of the distorted to the reference images, as published
# with these calibration pairs (pyiqa 0.1.16, ResultsCalibra/results_official.csv).
REFERENCE = {"I03": 0.7237, "I04": 0.2572, "I06": 0.05079, "I08": 0.05205, "I19": 0.4253}


@pytest.fixture(scope="module")
def lpips_model():
    if not weights_path().is_file():
        pytest.fail(f"LPIPS weights missing at {weights_path()}: run `python scripts/setup_lpips.py`")
    return LPIPS()


def load_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))  # (H, W, 3) uint8


def test_mse_psnr_constant_frames():
    a = torch.full((2, 3, 8, 6, 3), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 1] = 110  # MSE 100 -> PSNR 10 log10(255^2 / 100)
    b[1, 2] = 0  # MSE 100^2
    mse = mse_255(b, a)
    expected = torch.zeros(2, 3)
    expected[0, 1], expected[1, 2] = 100.0, 10000.0
    assert mse.shape == (2, 3)
    torch.testing.assert_close(mse, expected)
    p = psnr(mse)
    assert p[0, 1].item() == pytest.approx(10 * np.log10(255**2 / 100), rel=1e-6)
    assert p[1, 2].item() == pytest.approx(10 * np.log10(255**2 / 1e4), rel=1e-6)
    assert torch.isinf(p[0, 0])


def test_float_inputs_map_to_255_scale():
    # -1 -> 0 and +1 -> 255: the largest possible error, PSNR 0 dB; either channel layout.
    lo = -torch.ones(1, 2, 3, 4, 5)
    hi = torch.ones(1, 2, 3, 4, 5)
    torch.testing.assert_close(mse_255(lo, hi), torch.full((1, 2), 255.0**2))
    torch.testing.assert_close(psnr(mse_255(lo, hi)), torch.zeros(1, 2))
    u8 = torch.randint(0, 256, (2, 2, 4, 4, 3), dtype=torch.uint8)
    torch.testing.assert_close(mse_255(u8.float() / 127.5 - 1, u8), torch.zeros(2, 2), atol=1e-3, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        mse_255(u8.long(), u8.long())
    with pytest.raises(ValueError, match="shape"):
        mse_255(u8[:, :1], u8)


def test_copy_last_prediction():
    cond = torch.arange(2 * 3 * 4).view(2, 3, 4)
    pred = copy_last_prediction(cond, horizon=5)
    assert pred.shape == (2, 5, 4)
    assert (pred == cond[:, 2:3]).all()


def test_lpips_reference_values(lpips_model):
    names = sorted(REFERENCE)
    ref = torch.stack([load_rgb(REF_DIR / f"{n}_ref.png") for n in names])[None]  # (1, 5, H, W, 3)
    dist = torch.stack([load_rgb(REF_DIR / f"{n}_dist.png") for n in names])[None]
    got = lpips_frames(dist, ref, lpips_model, chunk=2)[0]  # chunking must not change values
    for n, v in zip(names, got.tolist()):
        assert v == pytest.approx(REFERENCE[n], abs=1e-3), n


def test_lpips_identity_symmetry_and_batch_independence(lpips_model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 48, generator=g)).clamp(-1, 1)
    assert lpips_model(x, x).abs().max().item() < 1e-6
    d = lpips_model(x, y)
    assert (d > 0.01).all()
    torch.testing.assert_close(lpips_model(y, x), d)
    torch.testing.assert_close(lpips_model(x[1:2], y[1:2]), d[1:2], rtol=1e-4, atol=1e-6)


def test_score_frames(lpips_model):
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 256, (2, 3, 40, 32, 3), dtype=torch.uint8, generator=g)
    pred = target.clone()
    pred[:, 1:] = 255 - pred[:, 1:]
    s = score_frames(pred, target, lpips_model)
    assert set(s) == {"mse", "psnr", "lpips"}
    assert all(v.shape == (2, 3) for v in s.values())
    assert (s["mse"][:, 0] == 0).all() and (s["mse"][:, 1:] > 1000).all()
    assert torch.isinf(s["psnr"][:, 0]).all()
    assert (s["lpips"][:, 0].abs() < 1e-6).all() and (s["lpips"][:, 1:] > 0.05).all()
    assert set(score_frames(pred, target)) == {"mse", "psnr"}


def test_missing_weights_fail_loudly(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pt"
    monkeypatch.setenv("AWM_LPIPS_WEIGHTS", str(missing))
    with pytest.raises(FileNotFoundError, match="scripts/setup_lpips.py") as err:
        LPIPS()
    assert str(missing) in str(err.value)


def test_wrong_weights_file_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"features.convs.0.weight": torch.zeros(64, 3, 11, 11)}, bad)
    with pytest.raises(ValueError, match="missing"):
        LPIPS(weights=bad)
