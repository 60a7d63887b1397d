"""Evaluation: scores and tables against independent numpy computations, on real ALE frames with a
real (small, untrained) world model; then the full driver through Ray Data and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ale_windows import ale_windows
import torch

from models.rectified_flow import EulerSamplerConfig
from models.stdit import STDiT_models
from models.vae import VAE_models
from workers.evaluate import PSNR_MAX, frame_table, horizon_table, score_windows, window_actions
from workers.world_model import WorldModel, load_world_model, save_world_model, world_model_meta
from models.pixels import model_to_pixels, pixels_to_model

N_COND = 4


def _world_model(horizon: int = 2, action_mode: str = "future") -> WorldModel:
    torch.manual_seed(0)
    vae = VAE_models["tiny"]().eval()
    dit = STDiT_models["tiny"](in_channels=vae.cfg.latent_channels).eval()
    return WorldModel(vae, dit, latent_scale=1.0, n_cond=N_COND, horizon=horizon,
                      action_mode=action_mode, sampler=EulerSamplerConfig(num_steps=2))


@pytest.fixture(scope="module")
def windows():
    return ale_windows(num=3, length=N_COND + 3)


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
        # The paper's convention: PSNR of the mean MSE, not the mean of per-window PSNRs.
        assert rows[("copy_last", h)]["psnr_of_mean_mse"] == pytest.approx(
            10 * np.log10(255.0**2 / per_window.mean()), rel=1e-6)
    per_frame = {(r["method"], r["frame"]): r for r in frame_table(scores)}
    assert per_frame[("copy_last", 3)]["mse"] == pytest.approx(mse[:, 2].mean(), rel=1e-6)
    assert per_frame[("model", 1)]["mse"] == pytest.approx(model_mse[:, 0].mean(), rel=1e-6)
    assert per_frame[("model", 1)]["psnr_of_mean_mse"] == pytest.approx(
        10 * np.log10(255.0**2 / model_mse[:, 0].mean()), rel=1e-6)
    # Mean of per-window PSNRs >= PSNR of the mean MSE (Jensen): the two columns are not the same.
    assert rows[("model", 3)]["psnr"] >= rows[("model", 3)]["psnr_of_mean_mse"] - 1e-9


def test_trained_lengths_are_scored_on_their_own_rollouts(windows):
    """Generation length h that the model was trained for is scored on a rollout of h frames (the
    paper's Table 2), not on the first h frames of the longest rollout; other lengths say so."""
    frames, actions = windows
    torch.manual_seed(0)
    vae = VAE_models["tiny"]().eval()
    dit = STDiT_models["tiny"](in_channels=vae.cfg.latent_channels).eval()
    wm = WorldModel(vae, dit, latent_scale=1.0, n_cond=N_COND, horizon=3, action_mode="future",
                    sampler=EulerSamplerConfig(num_steps=2), trained_horizons=(1, 3))
    f, a = torch.from_numpy(frames), torch.from_numpy(actions)
    scores, pred = score_windows(wm, f, a, 3, None, torch.Generator().manual_seed(0), direct=(1, 2, 3))
    assert set(k.split("/")[0] for k in scores) == {"model", "copy_last", "model_T1", "model_T2"}
    # the direct rollout of 1 frame is an independent generation: recompute it
    g = torch.Generator().manual_seed(0)
    wm.predict(f[:, :N_COND], window_actions(a, N_COND, 3, "future"), 3, generator=g)  # the long rollout first
    one = wm.predict(f[:, :N_COND], window_actions(a, N_COND, 1, "future"), 1, generator=g)
    truth = frames[:, N_COND:N_COND + 1].astype(np.float64)
    np.testing.assert_allclose(scores["model_T1/mse"],
                               ((one.numpy().astype(np.float64) - truth) ** 2).mean(axis=(2, 3, 4)), rtol=1e-5)
    rows = {(r["method"], r["generation_length"]): r for r in horizon_table(scores, (1, 2, 3))}
    assert rows[("model", 1)]["rollout"] == "direct" and rows[("model", 3)]["rollout"] == "prefix"
    assert rows[("model", 1)]["mse"] == pytest.approx(scores["model_T1/mse"].mean(), rel=1e-9)
    assert rows[("model", 3)]["mse"] == pytest.approx(scores["model/mse"].mean(), rel=1e-9)
    assert rows[("copy_last", 1)]["rollout"] == "prefix"
    assert ("vae_recon", 1) not in rows  # not asked for


def test_vae_reconstruction_floor_is_scored_on_the_true_frames(windows):
    frames, actions = windows
    wm = _world_model(horizon=2)
    f, a = torch.from_numpy(frames), torch.from_numpy(actions)
    scores, _ = score_windows(wm, f, a, 3, None, torch.Generator().manual_seed(0), vae_recon=True)
    truth = f[:, N_COND:N_COND + 3]
    with torch.no_grad():
        mean, _ = wm.vae.encode(pixels_to_model(truth))
        recon = model_to_pixels(wm.vae.decode(mean, 3, (210, 160)))  # independent encode-decode
    want = ((recon.double() - truth.double()) ** 2).mean(dim=(2, 3, 4)).numpy()  # (B, 3)
    np.testing.assert_allclose(scores["vae_recon/mse"], want, rtol=1e-6)
    assert (scores["vae_recon/mse"] > 0).all()  # an untrained VAE is not the identity
    rows = {(r["method"], r["generation_length"]): r for r in horizon_table(scores, (1, 3))}
    assert rows[("vae_recon", 3)]["mse"] == pytest.approx(want.mean(), rel=1e-6)
    per_frame = {(r["method"], r["frame"]) for r in frame_table(scores)}
    assert ("vae_recon", 3) in per_frame


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


# -- the drivers end to end on the tiny collected dataset ------------------------------------------
GAME = "Breakout"


@pytest.fixture(scope="module")
def data_root(tiny_split_root) -> str:
    return tiny_split_root


@pytest.fixture(scope="module")
def trained(tiny_trained):
    return tiny_trained


def _run(client, name):
    exp = client.get_experiment_by_name("atari-world-model")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, f"one MLflow run named {name}"
    return runs[0]


def test_training_runs_are_in_mlflow_with_a_loadable_model(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import download_artifacts, local_tracking_uri

    run_dir, wm_path, dit_cfg = trained
    client = MlflowClient(local_tracking_uri(run_dir))
    vae_run, dit_run = _run(client, "vae"), _run(client, "dit")
    for run in (vae_run, dit_run):
        assert run.info.status == "FINISHED"
        assert run.data.params["steps"] == "4" and run.data.params["num_workers"] == "2"
        hist = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert float(dit_run.data.params["latent_scale"]) > 0  # measured on data by the driver
    assert float(dit_run.data.params["latent_scale"]) == pytest.approx(
        json.loads((wm_path / "world_model.json").read_text())["latent_scale"])
    assert {a.path for a in client.list_artifacts(vae_run.info.run_id)} == {"vae"}
    local = download_artifacts(local_tracking_uri(run_dir), dit_run.info.run_id, "world_model", tmp_path)
    wm = load_world_model(local)
    frames, actions = ale_windows(num=1, length=N_COND + 3, seed=3)
    out = wm.predict(torch.from_numpy(frames[:, :N_COND]), torch.from_numpy(actions[:, 3:6]), 3)
    assert out.shape == (1, 3, 210, 160, 3) and out.dtype == torch.uint8


def test_vae_logs_its_heldout_floor_as_the_evaluation_scores_it(trained, data_root):
    """val_every: rank 0 of the VAE job scores held-out windows (spread over the val split) at
    every val_every steps, merged with that step's training line, in the JSONL and MLflow. The
    exported VAE is the EMA of the check with the lowest `val/mse_train` (fixed training windows),
    so its floor on those frames, computed here independently, is that check's `val/mse`; the raw
    weights are scored apart from the EMA's."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import local_tracking_uri
    from workers.data import spread_window_dataset
    from workers.train_common import metrics_path, read_metrics
    from workers.world_model import load_vae

    run_dir = trained[0]
    rows = [r for r in read_metrics(metrics_path(run_dir, "vae")) if "event" not in r]
    val = [r for r in rows if "val/mse" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all("train/recon" in r and "val/mse_raw" in r and r["val/recon_train_way"] > 0 for r in val)
    ds, n = spread_window_dataset(data_root, GAME, "val", 4, 8, 3)
    frames = torch.from_numpy(np.stack([r["frames"] for r in ds.take_all()]))
    assert n == len(frames) == 3
    vae = load_vae(Path(run_dir) / "models" / "vae")
    with torch.no_grad():
        mean, _ = vae.encode(pixels_to_model(frames))
        rec = model_to_pixels(vae.decode(mean, 4, (210, 160)))
    want = ((rec.double() - frames.double()) ** 2).mean().item()
    chosen = min(val, key=lambda r: r["val/mse_train"])
    assert chosen["val/mse"] == pytest.approx(want, rel=1e-4)
    assert [r["step"] for r in val if "val/best_step" in r][-1] == chosen["step"]
    assert val[-1]["val/mse_raw"] != pytest.approx(val[-1]["val/mse"], rel=1e-3)  # EMA lags the raw weights
    client = MlflowClient(local_tracking_uri(run_dir))
    run = _run(client, "vae")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/mse")) == [2, 4]
    assert run.data.tags["vae/exported_step"] == str(chosen["step"])


def test_spread_windows_cut_only_their_episodes(data_root):
    """clip_dataset(episodes=...) keeps those episodes' rows before they are cut into windows: the
    windows are the whole split's windows of those episodes, frame for frame, and no other's;
    spread_window_dataset cuts exactly the windows it chose, the same frames, without a shuffle."""
    from workers import schema as S
    from workers.clips import cut_windows, parquet_files, spread_indices, window_keys_of_split
    from workers.data import chosen_window_dataset, clip_dataset, spread_window_dataset

    every = {(r["episode_id"], int(r["start_step"])): r for r in clip_dataset(data_root, "", "train", 4, 8).take_all()}
    eids = sorted({e for e, _ in every})
    assert len(eids) >= 2
    some = clip_dataset(data_root, "", "train", 4, 8, episodes={eids[-1]}).take_all()
    assert sorted((r["episode_id"], int(r["start_step"])) for r in some) == sorted(k for k in every if k[0] == eids[-1])
    for r in some:
        np.testing.assert_array_equal(r["frames"], every[(r["episode_id"], int(r["start_step"]))]["frames"])
        np.testing.assert_array_equal(r["actions"], every[(r["episode_id"], int(r["start_step"]))]["actions"])
    keys = window_keys_of_split(data_root, 4, 8, split="train")
    assert sorted(every) == keys
    ds, n = spread_window_dataset(data_root, "", "train", 4, 8, 3)
    plan = repr(ds)  # the logical plan, before it runs
    got = {(r["episode_id"], int(r["start_step"])): r for r in ds.take_all()}
    assert n == 3 and sorted(got) == [keys[i] for i in spread_indices(len(keys), 3)]
    for k, r in got.items():
        np.testing.assert_array_equal(r["frames"], every[k]["frames"])
        np.testing.assert_array_equal(r["actions"], every[k]["actions"])
    # the chosen windows are cut by read tasks, one per few episodes: no shuffle gathers the rows
    assert "_cut_task" in plan and "Repartition" not in plan and "_windows_of_episode" not in plan, plan
    # a task cuts only its episodes' chosen windows, and names a start that is no window
    files = parquet_files(data_root)
    cut = [b for b in cut_windows(files, {eids[0]: [0]}, 4, 8)]
    assert [(str(e), int(s)) for b in cut for e, s in zip(b["episode_id"], b["start_step"])] == [(eids[0], 0)]
    with pytest.raises(S.DatasetError, match=f"episode {eids[0]}: no window of 4 steps every 8 starts at step"):
        list(cut_windows(files, {eids[0]: [3]}, 4, 8))
    with pytest.raises(ValueError, match="1 of the 1 episodes asked for are not in"):
        chosen_window_dataset(data_root, {("no-such-episode", 0)}, 4, 8)
    with pytest.raises(ValueError, match="none of the 1 episodes asked for"):
        clip_dataset(data_root, "", "train", 4, 8, episodes={"no-such-episode"})


def test_snapshots_export_the_same_run_with_less_training(trained):
    """snapshot_s: the EMA weights at 0 s of training (the first step) are exported as their own
    world model beside the final one; a snapshot time the run never reached exports nothing."""
    run_dir, wm_path, _ = trained
    snap_dir = Path(run_dir) / "models" / "dit-at0s"
    meta = json.loads((snap_dir / "world_model.json").read_text())
    final = json.loads((wm_path / "world_model.json").read_text())
    assert meta["snapshot"]["at_s"] == 0.0 and meta["snapshot"]["step"] == meta["train_step"] == 1
    assert final["train_step"] == 4 and "snapshot" not in final
    assert not (Path(run_dir) / "models" / "dit-at3600s").exists()
    early, late = load_world_model(str(snap_dir)), load_world_model(str(wm_path))
    diffs = [float((a - b).abs().max()) for a, b in zip(early.dit.parameters(), late.dit.parameters())]
    assert max(diffs) > 0  # three more optimiser steps moved the average
    assert early.latent_scale == late.latent_scale and early.trained_horizons == late.trained_horizons


def test_evaluate_driver_tables_figures_and_copy_last(trained, data_root):
    from mlflow.tracking import MlflowClient
    from ray.data.expressions import col

    from pipeline.evaluate import EvalConfig, main
    from pipeline.tracking import load_table, local_tracking_uri
    from workers.clips import read_episodes, window_dataset

    run_dir, wm_path, _ = trained
    horizons = (1, 2, 3)
    cfg = EvalConfig(run_dir=run_dir, model_path=str(wm_path), data_root=data_root, games=(GAME,),
                     horizons=horizons, stride=16, max_windows=10_000, batch_size=8, figure_windows=1,
                     action_sequences=("00", "23"), idm_steps=0)
    tables = main(cfg)

    # Independent copy-last over every test window of the game, straight from the Parquet data.
    eps = read_episodes(data_root).filter(expr=col("game") == GAME)
    w = window_dataset(eps, N_COND + 3, 16, split="test", num_partitions=4).take_all()
    frames = np.stack([r["frames"] for r in w]).astype(np.float64)
    mse = ((frames[:, N_COND:] - frames[:, N_COND - 1:N_COND]) ** 2).mean(axis=(2, 3, 4))  # (N, 3)
    t2 = tables["generation_length"]
    for h in horizons:
        row = t2[(t2.method == "copy_last") & (t2.generation_length == h)].iloc[0]
        assert row["num_windows"] == len(w)
        assert row["mse"] == pytest.approx(mse[:, :h].mean(axis=1).mean(), rel=1e-6)
        assert row["lpips"] >= 0 and row["psnr"] > 0
    assert set(t2.method) == {"model", "copy_last", "vae_recon"} and set(t2.game) == {GAME}
    # lengths the model was trained to generate, shorter than the longest, get their own rollout
    trained_lengths = set(json.loads((wm_path / "world_model.json").read_text())["trained_horizons"])
    for h in horizons:
        row = t2[(t2.method == "model") & (t2.generation_length == h)].iloc[0]
        assert row["rollout"] == ("direct" if h in trained_lengths and h < max(horizons) else "prefix")

    client = MlflowClient(local_tracking_uri(run_dir))
    run = _run(client, "eval")
    back = load_table(local_tracking_uri(run_dir), run.info.run_id, "tables/generation_length.json")
    assert len(back) == 3 * len(horizons) and set(back.columns) >= {"mse", "psnr", "lpips", "mse_std"}
    # the paper reports this setting (Table 2: future actions, learned embedding) at T = 1 and 2
    vp = load_table(local_tracking_uri(run_dir), run.info.run_id, "tables/vs_paper.json")
    assert sorted(vp.generation_length) == [1, 2] and set(vp.game) == {GAME}
    assert list(tables["vs_paper"].paper_mse) == list(vp.paper_mse) and (vp.paper_mse > 0).all()
    pf = load_table(local_tracking_uri(run_dir), run.info.run_id, "tables/per_frame.json")
    assert sorted(pf[pf.method == "model"].frame) == [1, 2, 3]
    assert run.data.metrics[f"eval/{GAME}/copy_last/mse_h3"] == pytest.approx(mse.mean(axis=1).mean(), rel=1e-6)
    assert f"eval/{GAME}/model/lpips_h1" in run.data.metrics
    figs = {a.path for a in client.list_artifacts(run.info.run_id, f"figures/{GAME}")}
    assert {f"figures/{GAME}/strip_0.png", f"figures/{GAME}/actions.png",
            f"figures/{GAME}/{GAME}_rollout_0.gif"} <= figs
    top = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/mse_vs_horizon.png", "figures/psnr_vs_horizon.png", "figures/lpips_vs_horizon.png"} <= top


def test_tables_are_written_before_the_figures(trained, data_root, monkeypatch, tmp_path):
    """Scores reach disk before any figure is drawn: a figure step that dies (a lost node, a
    machine taken back) costs the figures, not the tables. The figures' rollouts run as a Ray task
    with the scoring resources, not on the driver."""
    import pandas as pd

    import pipeline.evaluate as ev

    run_dir, wm_path, _ = trained

    def dying_task(*args, **kwargs):
        raise RuntimeError("node lost while drawing figures")

    monkeypatch.setattr(ev, "figure_rollouts", dying_task)
    cfg = ev.EvalConfig(run_dir=str(tmp_path), model_path=str(wm_path), data_root=data_root, games=(GAME,),
                        horizons=(1, 2), stride=16, max_windows=4, batch_size=4, figure_windows=1,
                        action_sequences=("00",), name="dies", idm_steps=0)
    with pytest.raises(Exception, match="node lost while drawing figures"):
        ev.main(cfg)
    t = pd.read_csv(tmp_path / "eval" / "dies" / "generation_length.csv")
    assert set(t.method) == {"model", "copy_last", "vae_recon"} and sorted(set(t.generation_length)) == [1, 2]
    assert (t.num_windows == 4).all() and t.mse.notna().all()
    assert not list((tmp_path / "eval" / "dies").glob(".*.tmp"))


def test_figure_rollouts_match_the_world_model(trained):
    """The figures' task generates what the world model generates from the same noise."""
    from pipeline.evaluate import figure_rollouts

    _, wm_path, _ = trained
    wm = load_world_model(str(wm_path))
    frames, actions = ale_windows(num=2, length=N_COND + 2, seed=5)
    pred, rollouts = figure_rollouts(str(wm_path), None, "cpu", frames, actions.astype(np.int64), 2, ("01", "2"), 7)
    g = torch.Generator().manual_seed(7)
    _, want = score_windows(wm, torch.from_numpy(frames), torch.from_numpy(actions.astype(np.int64)), 2, None, g)
    np.testing.assert_array_equal(pred, want.numpy())
    assert rollouts["01"].shape == (2, 210, 160, 3) and rollouts["2"].shape == (1, 210, 160, 3)


def test_second_evaluation_scores_the_same_windows(trained, data_root, tmp_path):
    """windows_of: a later evaluation (another model, say a snapshot) scores exactly the windows an
    earlier one scored, by episode and start step, whatever order Ray Data reads them in."""
    import pipeline.evaluate as ev

    _, wm_path, _ = trained
    base = dict(run_dir=str(tmp_path), model_path=str(wm_path), data_root=data_root, games=(GAME,),
                horizons=(1, 2), stride=16, batch_size=4, figure_windows=0, lpips=False, vae_recon=False, idm_steps=0)
    first = ev.main(ev.EvalConfig(**base, max_windows=3, name="first"))["generation_length"]
    scores = tmp_path / "eval" / "first" / f"{GAME}_scores.npz"
    keys = ev.window_keys(str(scores))
    assert len(keys) == 3
    again = ev.main(ev.EvalConfig(**base, max_windows=1, name="again", windows_of=str(scores)))["generation_length"]
    assert ev.window_keys(str(tmp_path / "eval" / "again" / f"{GAME}_scores.npz")) == keys
    for h in (1, 2):
        a = first[(first.method == "copy_last") & (first.generation_length == h)].iloc[0]
        b = again[(again.method == "copy_last") & (again.generation_length == h)].iloc[0]
        assert b["num_windows"] == 3 and b["mse"] == pytest.approx(a["mse"], rel=1e-9)
    with pytest.raises(ValueError, match="exactly one game"):
        ev.EvalConfig(**{**base, "games": (GAME, "Pong")}, windows_of=str(scores))
    with pytest.raises(FileNotFoundError, match="no scores file"):
        ev.window_keys(str(tmp_path / "missing.npz"))


def test_scoring_task_runs_from_inside_a_trials_placement_group(ray_local):
    """A sweep trial evaluates inside a Tune placement group that captures child tasks and holds a
    0.01-CPU bundle; the figures' task (0.5 CPU here) must still schedule, on the cluster."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.evaluate import EvalConfig, scoring_task

    cfg = EvalConfig(num_cpus=0.5)

    def twice(x):  # defined here: pickled by value, as the workers cannot import tests/
        return 2 * x

    @ray.remote(num_cpus=0.01)
    def trial():
        return ray.get(scoring_task(twice, cfg).remote(21))

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready())
    try:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        assert ray.get(trial.options(scheduling_strategy=strategy).remote(), timeout=120) == 42
    finally:
        remove_placement_group(pg)
