"""Evaluation: scores and tables against independent numpy computations, on real ALE frames with a
real (small, untrained) world model; then the full driver through Ray Data and MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.rectified_flow import EulerSamplerConfig
from models.stdit import STDiT_models
from models.vae import VAE_models
from workers.evaluate import PSNR_MAX, frame_table, horizon_table, score_windows, window_actions
from workers.world_model import WorldModel, load_world_model, save_world_model, world_model_meta

N_COND = 4


def _ale_windows(num: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Windows of real Breakout play (random actions), (num, length, 210, 160, 3) and (num, length)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", repeat_action_probability=0.0)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    frames, actions = [], []
    while len(frames) < num * length:
        a = int(rng.integers(4))
        frames.append(obs)
        actions.append(a)
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    f = np.stack(frames).reshape(num, length, 210, 160, 3)
    return f, np.asarray(actions, dtype=np.int64).reshape(num, length)


def _world_model(horizon: int = 2, action_mode: str = "future") -> WorldModel:
    torch.manual_seed(0)
    vae = VAE_models["tiny"]().eval()
    dit = STDiT_models["tiny"](in_channels=vae.cfg.latent_channels).eval()
    return WorldModel(vae, dit, latent_scale=1.0, n_cond=N_COND, horizon=horizon,
                      action_mode=action_mode, sampler=EulerSamplerConfig(num_steps=2))


@pytest.fixture(scope="module")
def windows():
    return _ale_windows(num=3, length=N_COND + 3)


def test_window_actions_match_contract():
    a = torch.arange(10)[None].repeat(2, 1)  # action id = frame index
    assert window_actions(a, 4, 3, "future")[0].tolist() == [3, 4, 5]  # a_t .. a_{t+T-1}
    assert window_actions(a, 4, 3, "past_future")[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_copy_last_row_equals_independent_computation(windows):
    frames, actions = windows
    wm = _world_model(horizon=2)
    H = 3  # longer than the trained 2: two chained chunks
    scores, pred = score_windows(wm, torch.from_numpy(frames), torch.from_numpy(actions), H)
    assert pred.shape == (3, H, 210, 160, 3) and pred.dtype == torch.uint8

    # Independent copy-last: numpy, float64, straight from the definition.
    truth = frames[:, N_COND:N_COND + H].astype(np.float64)
    last = frames[:, N_COND - 1:N_COND].astype(np.float64)
    mse = ((truth - last) ** 2).mean(axis=(2, 3, 4))  # (N, H)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(255.0**2 / mse), PSNR_MAX)
    np.testing.assert_allclose(scores["copy_last/mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(scores["copy_last/psnr"], psnr, rtol=1e-5)
    model_mse = ((pred.numpy().astype(np.float64) - truth) ** 2).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(scores["model/mse"], model_mse, rtol=1e-5)

    rows = {(r["method"], r["generation_length"]): r for r in horizon_table(scores, (1, 2, 3))}
    for h in (1, 2, 3):
        per_window = mse[:, :h].mean(axis=1)
        assert rows[("copy_last", h)]["mse"] == pytest.approx(per_window.mean(), rel=1e-6)
        assert rows[("copy_last", h)]["mse_std"] == pytest.approx(per_window.std(), rel=1e-6, abs=1e-9)
        assert rows[("copy_last", h)]["num_windows"] == 3
    per_frame = {(r["method"], r["frame"]): r for r in frame_table(scores)}
    assert per_frame[("copy_last", 3)]["mse"] == pytest.approx(mse[:, 2].mean(), rel=1e-6)
    assert per_frame[("model", 1)]["mse"] == pytest.approx(model_mse[:, 0].mean(), rel=1e-6)


def test_lpips_scores_are_real_and_zero_on_identical(windows):
    from models.lpips import LPIPS

    frames, actions = windows
    wm = _world_model(horizon=1)
    scores, _ = score_windows(wm, torch.from_numpy(frames), torch.from_numpy(actions), 1, LPIPS())
    assert scores["model/lpips"].shape == (3, 1)
    assert np.all(scores["model/lpips"] > scores["copy_last/lpips"])  # noise vs a near-identical frame
    # copy-last of a frame onto itself must give 0
    same = torch.from_numpy(np.repeat(frames[:, :1], N_COND + 1, axis=1))
    s, _ = score_windows(wm, same, torch.from_numpy(actions[:, :N_COND + 1]), 1, LPIPS())
    assert np.allclose(s["copy_last/lpips"], 0.0, atol=1e-6) and np.all(s["copy_last/psnr"] == PSNR_MAX)


def test_world_model_roundtrip_and_bad_input(tmp_path, windows):
    frames, actions = windows
    wm = _world_model(horizon=2, action_mode="past_future")
    meta = world_model_meta(wm.dit, latent_scale=1.0, n_cond=N_COND, horizon=2, action_mode="past_future", sample_steps=2)
    path = save_world_model(tmp_path / "wm", wm.vae, wm.dit, meta)
    back = load_world_model(path)
    cond = torch.from_numpy(frames[:1, :N_COND])
    acts = torch.from_numpy(actions[:1, :N_COND - 1 + 2])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(wm.predict(cond, acts, 2, generator=g1), back.predict(cond, acts, 2, generator=g2))
    with pytest.raises(ValueError, match="actions must be"):
        back.predict(cond, acts[:, :2], 2)
    with pytest.raises(ValueError, match="uint8"):
        back.predict(cond.float(), acts, 2)
    with pytest.raises(FileNotFoundError, match="world_model.json"):
        load_world_model(tmp_path)
