"""The evaluation protocol: three splits by episode, episode-bootstrap intervals, pairing by window
key, and the results tables pooling only runs of the current preset version. No Ray: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workers import schema as S


def _ids(n: int, run: str = "r") -> list[str]:
    return [f"{run}.Pong.s0.w{i % 7}.{i % 3}.{i}~{1000 + i}.abcdef" for i in range(n)]


def test_three_splits_are_disjoint_stable_and_keep_the_test_bucket():
    ids = _ids(20_000)
    three = [S.split_of(e, 0.2, 0.2) for e in ids]
    two = [S.split_of(e, 0.2) for e in ids]
    # one split per episode, each about its share of the episodes
    share = {s: three.count(s) / len(ids) for s in S.SPLITS}
    assert share["test"] == pytest.approx(0.2, abs=0.015) and share["val"] == pytest.approx(0.2, abs=0.015)
    assert share["train"] == pytest.approx(0.6, abs=0.015)
    # adding val leaves every test episode in test, and takes val out of train only
    assert all((a == "test") == (b == "test") for a, b in zip(three, two))
    assert {b for a, b in zip(three, two) if a == "val"} == {"train"}
    # stable: a rerun (other process part of the id) gives the same split
    again = [S.split_of(e.split(S.EPISODE_ID_PROCESS_SEP)[0] + "~99.ffffff", 0.2, 0.2) for e in ids]
    assert again == three


def test_bad_split_fractions_and_split_names_are_refused():
    from pipeline.collect import CollectConfig
    from pipeline.evaluate import EvalConfig

    with pytest.raises(ValueError, match="val_fraction"):
        CollectConfig(test_fraction=0.6, val_fraction=0.5)
    with pytest.raises(ValueError, match="'valid' is no split"):
        EvalConfig(split="valid")


def _population(rng, n_eps: int, effect_sd: float = 2.0, noise_sd: float = 3.0):
    """Windows of episodes with an episode effect: the windows of one episode are correlated."""
    sizes = rng.integers(3, 12, size=n_eps)
    eff = rng.normal(0, effect_sd, size=n_eps)
    eids = np.repeat(np.arange(n_eps), sizes).astype(str)
    vals = 10 + np.repeat(eff, sizes) + rng.normal(0, noise_sd, size=sizes.sum())
    return eids, vals


def test_episode_bootstrap_covers_the_true_mean_at_about_the_nominal_rate():
    from pipeline.stats import EpisodeBootstrap

    rng = np.random.default_rng(0)
    hits, reps = 0, 200
    for i in range(reps):
        eids, vals = _population(rng, 40)
        # the population mean of a window's expected value is 10 (episode effects have mean 0)
        ci, _ = EpisodeBootstrap([eids], n_boot=600, seed=i).mean([vals])
        hits += ci.low <= 10.0 <= ci.high
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_window_bootstrap_would_undercover_episode_bootstrap_does_not():
    """Resampling windows as if independent gives narrower intervals than episodes warrant."""
    from pipeline.stats import EpisodeBootstrap

    rng = np.random.default_rng(1)
    eids, vals = _population(rng, 40, effect_sd=4.0, noise_sd=1.0)
    by_episode, _ = EpisodeBootstrap([eids], n_boot=1000).mean([vals])
    by_window, _ = EpisodeBootstrap([np.arange(len(vals)).astype(str)], n_boot=1000).mean([vals])
    assert (by_episode.high - by_episode.low) > 1.8 * (by_window.high - by_window.low)


def test_seeds_of_one_collection_share_the_resample():
    """Two seeds scored on the same windows: the resample of their difference is paired, so a
    constant offset between them has a zero-width interval."""
    from pipeline.stats import EpisodeBootstrap

    rng = np.random.default_rng(2)
    eids, vals = _population(rng, 30)
    boot = EpisodeBootstrap([eids, eids], n_boot=500)
    _, reps = boot.run_means([vals, vals + 1.5])
    assert np.allclose(reps[:, 1] - reps[:, 0], 1.5)
    other = EpisodeBootstrap([eids, np.char.add(eids, "x")], n_boot=500)  # another collection: independent draws
    _, reps = other.run_means([vals, vals + 1.5])
    assert np.std(reps[:, 1] - reps[:, 0]) > 0.1


def test_jobs_that_recollect_the_same_games_share_the_resample():
    """Two jobs collecting with the same settings record the same games under ids that differ after
    "~" (the process part): pooled, their evaluations resample those games together, so the interval
    of a method scored the same in both is that of one job, not narrowed by counting the games twice."""
    from pipeline.stats import EpisodeBootstrap

    rng = np.random.default_rng(4)
    eids, vals = _population(rng, 30)
    pos = np.char.add("gpu.Breakout.s0.w1.", eids)
    job_a, job_b = np.char.add(pos, "~101.aa11bb"), np.char.add(pos, "~202.cc33dd")
    one, _ = EpisodeBootstrap([job_a], n_boot=800, seed=5).mean([vals])
    both, reps = EpisodeBootstrap([job_a, job_b], n_boot=800, seed=5).mean([vals, vals])
    assert (both.low, both.high) == pytest.approx((one.low, one.high))
    # keyed by the whole id, the two jobs' games would be drawn apart: a narrower, wrong interval
    apart, _ = EpisodeBootstrap([pos, np.char.add(pos, "x")], n_boot=800, seed=5).mean([vals, vals])
    assert (apart.high - apart.low) < 0.85 * (one.high - one.low)


def test_runs_that_share_some_games_draw_them_once():
    """Runs whose held-out games overlap only in part (another window budget, a restarted runner)
    still draw the shared games together: their replicate means move together, where runs with no
    game in common are drawn independently."""
    from pipeline.stats import EpisodeBootstrap

    rng = np.random.default_rng(6)
    effect = rng.normal(0, 3.0, size=60)  # one value per game, the same whichever run scored it
    ids = np.array([f"gpu.Breakout.s0.w1.{i}~{100 + i}.ab" for i in range(60)])
    a, b, c = np.arange(0, 30), np.arange(15, 45), np.arange(30, 60)  # a and b share 15 games
    other = np.array([f"gpu.Breakout.s1.w1.{i}~{100 + i}.ab" for i in range(60)])  # c: another collection
    boot = EpisodeBootstrap([ids[a], ids[b], other[c]], n_boot=2000, seed=7)
    assert boot.episodes == [30, 30, 30]
    _, reps = boot.run_means([effect[a], effect[b], effect[c]])
    corr = np.corrcoef(reps.T)
    assert corr[0, 1] > 0.3, corr  # drawn apart, as before, this was about 0
    assert abs(corr[0, 2]) < 0.1 and not np.isnan(reps).any(), corr


def _scores(rng, n_eps: int = 12, per: int = 4, frames: int = 4, shift: float = 0.0):
    eids = np.repeat([f"g.e{i}~1.a" for i in range(n_eps)], per)
    starts = np.tile(np.arange(per) * 8, n_eps)
    base = rng.gamma(2.0, 5.0, size=(n_eps * per, 1)) * np.linspace(1, 2, frames)
    out = {"episode_id": eids, "start_step": starts}
    for method, scale in (("model", 0.5), ("copy_last", 1.0), ("vae_recon", 0.1)):
        # the model's error is not proportional to copy-last's, window by window
        mse = base * scale * (rng.lognormal(0, 0.5, size=(len(base), 1)) if method == "model" else 1) + shift
        out[f"{method}/mse"] = mse
        out[f"{method}/psnr"] = 10 * np.log10(255 ** 2 / mse)
        out[f"{method}/lpips"] = mse / 1000
    for T in (1, 2, 4):
        out[f"model_T{T}/mse"] = out["model/mse"][:, :T] * 0.9
        out[f"model_T{T}/psnr"] = 10 * np.log10(255 ** 2 / out[f"model_T{T}/mse"])
        out[f"model_T{T}/lpips"] = out[f"model_T{T}/mse"] / 1000
    return out


def test_pairing_uses_window_keys_not_row_order():
    from pipeline.stats import align, pooled_rows, window_keys

    rng = np.random.default_rng(3)
    a = _scores(rng)
    perm = rng.permutation(len(a["episode_id"]))
    shuffled = {k: v[perm] for k, v in a.items()}
    # the paired model - copy-last difference (dB over copy-last) is the same on a shuffled file
    r1 = {(r["method"], r["T"]): r for r in pooled_rows([a], (1, 2, 4), n_boot=300)}
    r2 = {(r["method"], r["T"]): r for r in pooled_rows([shuffled], (1, 2, 4), n_boot=300)}
    for key in r1:
        assert r1[key]["db_over_copy_last"] == pytest.approx(r2[key]["db_over_copy_last"], rel=1e-12)
        assert r1[key]["mse"] == pytest.approx(r2[key]["mse"], rel=1e-12)
    # across files: align lines b up with a by key
    ka, kb = window_keys(a["episode_id"], a["start_step"]), window_keys(shuffled["episode_id"], shuffled["start_step"])
    idx = align(ka, kb)
    assert np.array_equal(shuffled["model/mse"][idx], a["model/mse"])
    with pytest.raises(ValueError, match="different windows"):
        align(ka, kb[:-1])  # a window missing on one side is never dropped silently


def test_pooled_rows_match_a_direct_computation():
    from pipeline.stats import pooled_rows

    rng = np.random.default_rng(4)
    runs = [_scores(rng), _scores(rng)]
    rows = {(r["method"], r["T"]): r for r in pooled_rows(runs, (1, 2, 4), n_boot=300)}
    per_seed = [r["model_T4/mse"].mean(axis=1).mean() for r in runs]
    got = rows[("model", 4)]
    assert got["mse"] == pytest.approx(np.mean(per_seed)) and got["seeds"] == 2
    assert got["mse_std_seeds"] == pytest.approx(np.std(per_seed, ddof=1))
    half = 12.706 * np.std(per_seed, ddof=1) / np.sqrt(2)  # t(0.975, 1 df) over two seeds
    assert (got["mse_seed_ci_low"], got["mse_seed_ci_high"]) == pytest.approx((np.mean(per_seed) - half,
                                                                               np.mean(per_seed) + half))
    assert got["mse_ci_low"] < got["mse"] < got["mse_ci_high"]
    copy = np.mean([r["copy_last/mse"][:, :4].mean(axis=1).mean() for r in runs])
    assert got["db_over_copy_last"] == pytest.approx(10 * np.log10(copy / got["mse"]))
    assert got["db_ci_low"] < got["db_over_copy_last"] < got["db_ci_high"]
    assert rows[("copy_last", 2)]["rollout"] == "prefix" and got["rollout"] == "direct"


def _record(root: Path, rng, *, version: str, seed: int, game: str = "Pong", split: str = "test",
            keys: bool = True, actions: float = 0.0, extra: dict | None = None) -> Path:
    """A recorded run; `actions` > 0 adds action-test rollouts whose wrong actions cost that factor."""
    from pipeline.results import record_run

    scores = _scores(rng)
    if not keys:
        scores = {k: v for k, v in scores.items() if "/" in k}
    if actions:
        rec = scores["model/mse"]
        scores.update({"action_recorded/mse": rec, "action_permuted/mse": rec * actions,
                       "action_noop/mse": rec * actions, "action_recorded/differs": np.zeros(rec.shape, bool),
                       "action_permuted/differs": np.ones(rec.shape, bool),
                       "action_noop/differs": np.ones(rec.shape, bool)})
    f = root / f"tmp_{seed}_{version}.npz"
    np.savez_compressed(f, **{k.replace("/", "__"): v for k, v in scores.items()})
    return record_run(root / "runs", f, preset="gpu", version=version, game=game, seed=seed, split=split,
                      settings={}, stage_walls={"dit": 1.0}, command="test", extra=extra)


def test_table_builder_pools_only_the_current_preset_version(tmp_path):
    from pipeline.results import ResultsError, build_tables, current_version

    v = current_version("gpu")
    rng = np.random.default_rng(5)
    ok = [_record(tmp_path, rng, version=v, seed=s) for s in (0, 1, 2)]
    old = _record(tmp_path, rng, version="0000000000", seed=3)
    on_val = _record(tmp_path, rng, version=v, seed=4, split="val")
    again = _record(tmp_path, rng, version=v, seed=2)  # seed 2 evaluated again: its newest record counts
    out = tmp_path / "current"
    df = build_tables(tmp_path / "runs", out, "gpu", n_boot=200)
    meta = json.loads((out / "table2.meta.json").read_text())
    assert sorted(r["run_id"] for r in meta["runs"]) == sorted([ok[0].name, ok[1].name, again.name])
    assert {r["run_id"] for r in meta["not_pooled"]} == {old.name, on_val.name, ok[2].name}
    model4 = df[(df.game == "Pong") & (df["T"] == 4) & (df.method == "model")].iloc[0]
    assert model4.seeds == 3 and model4.episodes == 12 and model4.windows == 48 and model4.reported
    one = build_tables(tmp_path / "runs", tmp_path / "one", "gpu", runs=[ok[0]], n_boot=50)
    assert not one[one.method == "model"].reported.any() and "(too few)" in (tmp_path / "one" / "table2.md").read_text()
    assert set(df.method) == {"model", "copy_last", "vae_recon", "paper (other data)"}
    assert (out / "table2.csv").read_text().splitlines()[0].startswith("game,T,method,mse,mse_ci_low")
    assert not (out / "action_fidelity.csv").exists()  # these scores carry no action-fidelity rollouts
    # bad input, named: a run of another version asked for by name, a scores file without window keys
    with pytest.raises(ResultsError, match="preset version 0000000000"):
        build_tables(tmp_path / "runs", out, "gpu", runs=[old, *ok], n_boot=50)
    nokeys = _record(tmp_path, rng, version=v, seed=5, keys=False)
    with pytest.raises(ResultsError, match="no window keys"):
        build_tables(tmp_path / "runs", out, "gpu", runs=[nokeys], n_boot=50)


def test_other_policy_records_give_their_own_action_fidelity_rows_not_table2(tmp_path):
    """A record marked test_set "other_policy" (run.json, via record_run's extra) gets its own rows in
    action_fidelity.csv and never enters Table 2; a seed has one newest record per test set."""
    from pipeline.results import build_tables, current_version

    v, rng = current_version("gpu"), np.random.default_rng(11)
    own = [_record(tmp_path, rng, version=v, seed=s, actions=2.0) for s in (0, 1)]
    other = [_record(tmp_path, rng, version=v, seed=s, actions=1.25, extra={"test_set": "other_policy"})
             for s in (0, 1)]
    out = tmp_path / "current"
    build_tables(tmp_path / "runs", out, "gpu", n_boot=50)
    af = pd.read_csv(out / "action_fidelity.csv")
    assert list(af.test_set) == ["test"] * 3 + ["other_policy"] * 3 and list(af["T"]) == [1, 2, 4] * 2
    by = af.set_index(["test_set", "T"])
    assert by.loc[("test", 4), "dpsnr_vs_permuted"] == pytest.approx(10 * np.log10(2.0))
    assert by.loc[("other_policy", 4), "dpsnr_vs_noop"] == pytest.approx(10 * np.log10(1.25))
    assert (af.seeds == 2).all() and (af.windows == af.windows_noop).all()
    t2 = json.loads((out / "table2.meta.json").read_text())
    assert sorted(r["run_id"] for r in t2["runs"]) == sorted(p.name for p in own) and not t2["not_pooled"]
    meta = json.loads((out / "action_fidelity.meta.json").read_text())
    assert sorted(r["run_id"] for r in meta["other_policy_runs"]) == sorted(p.name for p in other)


def test_preset_version_ignores_seeds_and_resources_not_settings():
    from pipeline.presets import PRESETS, preset_version, with_overrides, with_seed

    gpu = PRESETS["gpu"]()
    v = preset_version(gpu)
    assert preset_version(with_seed(gpu, 7)) == v
    assert preset_version(with_overrides(gpu, ("dit.num_workers=2", "evaluate.batch_size=8"))) == v
    assert preset_version(with_overrides(gpu, ("dit.steps=10",))) != v
    assert preset_version(with_overrides(gpu, ("evaluate.split=val",))) != v
    assert preset_version(PRESETS["smoke"]()) != v


class _FakeWorldModel:
    """A stand-in with WorldModel's predict contract on 8x8 frames: the next frame is the last
    condition frame brightened by 10 x the action (never past 255), plus noise from the generator; `uses_actions`
    False ignores the actions (a copy-last with noise)."""

    def __init__(self, uses_actions: bool, num_actions: int = 4):
        from types import SimpleNamespace

        self.n_cond, self.action_mode, self.uses = 2, "future", uses_actions
        self.dit = SimpleNamespace(cfg=SimpleNamespace(num_actions=num_actions))

    def predict(self, cond, actions, horizon, generator=None):
        import torch

        last = cond[:, -1:].float()  # (B, 1, H, W, 3)
        steps = torch.cumsum(actions[:, -horizon:].float(), dim=1) if self.uses else torch.zeros(len(cond), horizon)
        noise = torch.randn(len(cond), horizon, *cond.shape[2:], generator=generator)
        return (last + 10 * steps[:, :, None, None, None] + noise).clamp(0, 255).to(torch.uint8)


def _action_windows(rng, n: int = 64, H: int = 4, size: tuple[int, int] = (8, 8)):
    """Windows whose true frames follow the fake model's rule with each window's own actions."""
    import torch

    actions = torch.from_numpy(rng.integers(0, 4, size=(n, 2 + H))).long()
    start = torch.from_numpy(rng.integers(0, 40, size=(n, 1, *size, 3))).float()
    frames = [start, start]
    for k in range(H):
        frames.append(frames[-1] + 10 * actions[:, 1 + k].float()[:, None, None, None, None])
    return torch.cat(frames, dim=1).clamp(0, 255).to(torch.uint8), actions


def test_action_tests_separate_a_model_that_follows_its_actions_from_one_that_does_not():
    import torch

    from pipeline.stats import action_rows
    from workers.evaluate import score_windows

    rng = np.random.default_rng(6)
    frames, actions = _action_windows(rng)
    eids = np.array([f"e{i // 4}" for i in range(len(frames))])  # 16 episodes of 4 windows
    got = {}
    for uses in (True, False):
        scores, _ = score_windows(_FakeWorldModel(uses), frames, actions, 4, None, torch.Generator().manual_seed(0),
                                  action_horizon=4)
        rows = {r["T"]: r for r in action_rows([{**scores, "episode_id": eids}], (1, 2, 4), n_boot=300)}
        got[uses] = rows
        if uses:
            recorded = {**scores, "episode_id": eids}
    follows, ignores = got[True], got[False]
    for T in (1, 2, 4):
        assert follows[T]["dpsnr_perm_ci_low"] > 1.0 and follows[T]["dpsnr_noop_ci_low"] > 1.0
        # the same noise for every rollout: a model that ignores actions differs by exactly nothing
        assert ignores[T]["dpsnr_vs_permuted"] == pytest.approx(0.0, abs=1e-9)
        assert ignores[T]["dpsnr_vs_noop"] == pytest.approx(0.0, abs=1e-9)
    assert follows[4]["recorded_better_permuted"] > 0.9
    # each action set's MSE and PSNR of the mean MSE on the windows of its difference: the difference
    # is the PSNR of the recorded actions minus that of the others
    for T in (1, 2, 4):
        for kind in ("permuted", "noop"):
            r = follows[T]
            assert r[f"psnr_of_mean_mse_{kind}"] == pytest.approx(10 * np.log10(255 ** 2 / r[f"mse_{kind}"]))
            assert (r[f"psnr_of_mean_mse_recorded_vs_{kind}"] - r[f"psnr_of_mean_mse_{kind}"]
                    == pytest.approx(r[f"dpsnr_vs_{kind}"]))
            assert r[f"mse_recorded_vs_{kind}"] < r[f"mse_{kind}"]
    # without partners the batch's windows lend each other their actions; a T-frame difference counts
    # the windows whose first T actions changed
    fut = actions[:, 1:5]  # the future actions a_t..a_{t+3} of windows with 2 condition frames
    moved = fut != torch.roll(fut, shifts=1, dims=0)
    for T in (1, 2, 4):
        assert follows[T]["windows_permuted"] == int(moved[:, :T].any(dim=1).sum())
        assert follows[T]["windows_noop"] == int((fut[:, :T] != 0).any(dim=1).sum())  # NOOP = action 0
    assert follows[1]["windows_permuted"] < follows[4]["windows_permuted"]
    # the committed table (pipeline/results.py): every column, each action set's MSE/PSNR, both window counts
    from pipeline.results import AF_COLUMNS, action_fidelity

    af = action_fidelity([({"game": "Pong"}, recorded)], n_boot=100)
    assert list(af.columns) == AF_COLUMNS and list(af["T"]) == [1, 2, 4] and set(af.test_set) == {"test"}
    af = af.set_index("T")
    for T in (1, 2, 4):
        row, want = af.loc[T], follows[T]
        assert row["windows"] == want["windows_permuted"] and row["windows_noop"] == want["windows_noop"]
        assert row["dpsnr_vs_permuted"] == pytest.approx(want["dpsnr_vs_permuted"])
        for kind in ("permuted", "noop"):
            for col in (f"mse_{kind}", f"psnr_of_mean_mse_{kind}", f"mse_recorded_vs_{kind}",
                        f"psnr_of_mean_mse_recorded_vs_{kind}"):
                assert row[col] == pytest.approx(want[col])
    assert af["idm_acc_ratio"].isna().all() and af["idm_kappa_ratio"].isna().all()  # no inverse-dynamics model
    bad = actions.clone()
    bad[0, 2] = 7  # a future action of the rollout
    with pytest.raises(ValueError, match=r"valid are 0\.\.3"):
        score_windows(_FakeWorldModel(True), frames, bad, 4, None, torch.Generator().manual_seed(0), action_horizon=4)


def test_inverse_dynamics_reads_the_recorded_rollouts_of_the_action_tests():
    """An IDM trained on real pairs of the stand-in game reads a model that follows its actions as
    well as the true frames, and one that ignores them at about a constant guess."""
    import torch

    from pipeline.stats import action_rows
    from workers.evaluate import frame_table, score_windows
    from workers.inverse_dynamics import IDMConfig, train_idm

    rng = np.random.default_rng(7)
    frames, actions = _action_windows(rng, n=48, size=(210, 160))
    # real training pairs: consecutive true frames of other windows of the same game
    tf, ta = _action_windows(np.random.default_rng(8), n=96, size=(210, 160))
    prev, nxt = tf[:, 1:-1].reshape(-1, 210, 160, 3), tf[:, 2:].reshape(-1, 210, 160, 3)
    idm, _ = train_idm(IDMConfig(pool=10, channels=(8,), hidden=32, steps=150, batch_size=64, lr=3e-3),
                       prev.numpy(), nxt.numpy(), ta[:, 1:-1].reshape(-1).numpy(), 4)
    eids = np.array([f"e{i // 4}" for i in range(len(frames))])
    rows, frames_of = {}, {}
    for uses in (True, False):
        scores, _ = score_windows(_FakeWorldModel(uses), frames, actions, 4, None, torch.Generator().manual_seed(0),
                                  action_horizon=4, idm=idm)
        rows[uses] = {r["T"]: r for r in action_rows([{**scores, "episode_id": eids}], (1, 4), n_boot=100)}
        frames_of[uses] = {r["frame"]: r for r in frame_table(scores) if r["method"] == "model"}
    follows, ignores = rows[True][4], rows[False][4]
    assert follows["idm_acc_real"] > 0.8 and follows["idm_acc_generated"] > 0.8 and follows["idm_acc_ratio"] > 0.9
    assert ignores["idm_acc_real"] == pytest.approx(follows["idm_acc_real"])  # same true frames
    for r in (follows, ignores):  # the plain ratio (the action target) and the chance-corrected one
        assert r["idm_acc_ratio"] == pytest.approx(r["idm_acc_generated"] / r["idm_acc_real"])
        assert r["idm_kappa_ratio"] == pytest.approx((r["idm_acc_generated"] - r["idm_majority_share"])
                                                     / (r["idm_acc_real"] - r["idm_majority_share"]))
    assert follows["idm_kappa_ratio"] > 0.85
    # chance-corrected: the ignoring model's generated frames carry no more than a constant guess
    assert ignores["idm_f1_generated"] <= 1 / 4 + 0.1 and abs(ignores["idm_kappa_ratio"]) < 0.2
    assert ignores["idm_acc_ratio"] < 0.5  # the plain ratio keeps the guess's share
    # per generated frame: the same predictions, so equal windows per frame average to the T-frame means
    for uses, per in frames_of.items():
        assert sorted(per) == [1, 2, 3, 4]
        for col in ("idm_acc_generated", "idm_acc_real"):
            assert np.mean([per[k][col] for k in (1, 2, 3, 4)]) == pytest.approx(rows[uses][4][col])
            assert per[1][col] == pytest.approx(rows[uses][1][col])
        assert per[2]["idm_acc_ratio"] == pytest.approx(per[2]["idm_acc_generated"] / per[2]["idm_acc_real"])


def test_permuted_partners_are_a_fixed_derangement_across_episodes():
    import torch

    from workers.evaluate import partner_keys, score_windows

    keys = [(f"e{e}", 8 * s) for e in range(6) for s in range(5)]
    part = partner_keys(list(reversed(keys)))
    assert part == partner_keys(keys)  # whatever order the windows come in
    assert sorted(part.values()) == sorted(keys) and all(k != v for k, v in part.items())
    assert all(k[0] != v[0] for k, v in part.items())  # spread windows: another episode
    assert partner_keys(keys[:1]) == {}
    # a batch of one window still gets a permuted rollout when its partner comes from the whole set
    rng = np.random.default_rng(9)
    frames, actions = _action_windows(rng, n=2)
    partner = actions.flip(0)
    scores, _ = score_windows(_FakeWorldModel(True), frames[:1], actions[:1], 4, None,
                              torch.Generator().manual_seed(0), action_horizon=4, partner_actions=partner[:1])
    expect = (actions[0, 1:5] != partner[0, 1:5]).numpy()
    assert (scores["action_permuted/differs"][0] == expect).all() and expect.any()


def test_counterfactual_strip_sequences_name_the_game_actions_and_refuse_bad_ones():
    from pipeline.evaluate import parse_sequence
    from workers.atari import action_meanings

    assert action_meanings("ALE/Breakout-v5", '{"frameskip": 4, "repeat_action_probability": 0.0}') == (
        "NOOP", "FIRE", "RIGHT", "LEFT")
    assert parse_sequence("3222") == [3, 2, 2, 2] and parse_sequence("10,10,17") == [10, 10, 17]
    with pytest.raises(ValueError, match="'RIGHT' is no sequence of action ids"):
        parse_sequence("RIGHT")


def test_random_policy_holds_its_actions_at_the_repeat_rate():
    """CollectConfig.random_repeat: each step keeps the previous action with that probability (plus the
    uniform draw's own 1/|A| chance of landing on it again)."""
    from pipeline.collect import CollectConfig, _parse
    from workers.rollout import RecordingLoop

    loop = RecordingLoop.__new__(RecordingLoop)  # the action draw alone, without a runner
    loop.rng, loop.num_actions, loop.num_envs, loop.last = np.random.default_rng(0), 4, 64, None
    for repeat, want in ((0.0, 0.25), (0.75, 0.75 + 0.25 / 4)):
        loop.last = None
        draws = np.stack([loop.actions(False, True, repeat) for _ in range(400)])  # (steps, envs)
        same = (draws[1:] == draws[:-1]).mean()
        assert same == pytest.approx(want, abs=0.02), (repeat, same)
        assert set(np.unique(draws)) == {0, 1, 2, 3}
    assert _parse(["--policy", "random", "--random-repeat", "0.5"]).random_repeat == 0.5
    with pytest.raises(ValueError, match="random_repeat"):
        CollectConfig(random_repeat=1.0)


def test_epsilon_greedy_replaces_the_policys_action_at_its_rate():
    """CollectConfig.epsilon: with that probability a step's action is uniform instead of the
    policy's; a policy sure of action 0 then plays 1-3 at epsilon * 3/4."""
    import torch
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical

    from pipeline.collect import CollectConfig
    from workers.rollout import RecordingLoop

    class Sure(torch.nn.Module):  # a policy that always picks action 0
        def forward_exploration(self, batch):
            n = batch[Columns.OBS].shape[0]
            return {Columns.ACTION_DIST_INPUTS: torch.tensor([[30.0, 0.0, 0.0, 0.0]]).repeat(n, 1)}

        def get_exploration_action_dist_cls(self):
            return TorchCategorical

    loop = RecordingLoop.__new__(RecordingLoop)
    loop.rng, loop.num_actions, loop.num_envs, loop.last = np.random.default_rng(1), 4, 64, None
    loop.module, loop.dtype, loop.obs = Sure(), torch.float32, np.zeros((64, 2), np.float32)
    loop.module.w = torch.nn.Linear(1, 1)  # a parameter: the loop reads the module's device from it
    for epsilon in (0.0, 0.4):
        draws = np.stack([loop.actions(True, False, 0.0, epsilon) for _ in range(300)])
        assert (draws != 0).mean() == pytest.approx(epsilon * 3 / 4, abs=0.02), epsilon
    with pytest.raises(ValueError, match="epsilon must be in"):
        CollectConfig(epsilon=1.5)


def test_imagination_table_pools_seeds_of_real_game_returns(tmp_path):
    """Seeds weigh equally whatever their game counts; the agent-vs-random interval excludes 0 for a
    clear gap and straddles it for none."""
    from pipeline.results import IMAGINATION_FILE, build_tables, current_version
    from pipeline.presets import PRESETS, imagine_version

    v, rng = current_version("gpu"), np.random.default_rng(9)
    means = {}
    for seed, n in ((0, 30), (1, 40), (2, 31)):
        rec = _record(tmp_path, rng, version=v, seed=seed)
        ret = {"imagination": rng.normal(6.0, 1.0, n), "random": rng.normal(1.0, 1.0, n),
               "ppo_real": rng.normal(1.2, 1.0, n)}
        (rec / "imagine.json").write_text(json.dumps({"imagine_version": imagine_version(PRESETS["gpu"]())}))
        np.savez(rec / IMAGINATION_FILE, **{f"{a}__returns": r for a, r in ret.items()},
                 **{f"{a}__lengths": np.full(n, 100) for a in ret},
                 **{f"{a}__truncated": np.arange(n) < (1 if a == "random" else 0) for a in ret})
        for a, r in ret.items():
            means.setdefault(a, []).append(r.mean())
    build_tables(tmp_path / "runs", tmp_path / "current", "gpu", n_boot=400)
    df = pd.read_csv(tmp_path / "current" / "imagination.csv").set_index("agent")
    assert {"imagination", "random", "ppo_real", "DIAMOND (Atari 100k)"} <= set(df.index)
    assert (df.seeds.dropna() == 3).all() and df.loc["DIAMOND (Atari 100k)", "return_mean"] == 20.4  # Pong
    assert df.loc["imagination", "return_mean"] == pytest.approx(np.mean(means["imagination"]), rel=1e-5)
    assert df.loc["random", "episodes"] == 101 and df.loc["random", "truncated"] == 3
    imag, ppo = df.loc["imagination"], df.loc["ppo_real"]
    assert imag.return_ci_low < imag.return_mean < imag.return_ci_high and imag.diff_ci_low > 4.0
    assert ppo.diff_ci_low < 0.2 < ppo.diff_ci_high and np.isnan(df.loc["random", "diff_vs_random"])
    # a record of another imagine setting (e.g. a longer PPO budget) is not pooled with these
    other = _record(tmp_path, rng, version=v, seed=3)
    (other / "imagine.json").write_text(json.dumps({"imagine_version": "another"}))
    np.savez(other / IMAGINATION_FILE, imagination__returns=np.full(30, 100.0), imagination__lengths=np.full(30, 9),
             imagination__truncated=np.zeros(30, bool))
    build_tables(tmp_path / "runs", tmp_path / "current", "gpu", n_boot=100)
    again = pd.read_csv(tmp_path / "current" / "imagination.csv").set_index("agent")
    assert again.loc["imagination", "seeds"] == 3 and again.loc["imagination", "return_mean"] < 10


def test_guidance_needs_a_world_model_trained_with_action_dropout(tiny_trained, tmp_path):
    """Classifier-free guidance over actions is refused, through the loader, on a model whose
    train_config records action_dropout 0; a model folder that records dropout takes it, and guidance
    changes its prediction on the same noise."""
    import shutil

    import torch

    from workers.world_model import load_world_model

    _, wm_path, dit_cfg = tiny_trained
    assert dit_cfg.action_dropout == 0.0
    with pytest.raises(ValueError, match=r"guidance_scale=1\.5 .*action_dropout=0\.0.*TrainDiTConfig\.action_dropout") as err:
        load_world_model(wm_path, guidance_scale=1.5)
    assert str(wm_path) in str(err.value)
    assert load_world_model(wm_path, guidance_scale=1.0).sampler.cfg.guidance_scale == 1.0
    # the same weights in a folder whose train_config records dropout (the loader trusts the record)
    dropped = tmp_path / "wm"
    shutil.copytree(wm_path, dropped)
    meta = json.loads((dropped / "world_model.json").read_text())
    meta["train_config"]["action_dropout"] = 0.1
    (dropped / "world_model.json").write_text(json.dumps(meta))
    plain, guided = load_world_model(dropped, guidance_scale=1.0), load_world_model(dropped, guidance_scale=1.5)
    assert guided.sampler.cfg.guidance_scale == 1.5
    rng = np.random.default_rng(0)
    cond = torch.from_numpy(rng.integers(0, 256, size=(1, plain.n_cond, 210, 160, 3), dtype=np.uint8))
    acts = torch.ones(1, plain.num_actions_for(plain.horizon), dtype=torch.int64)
    a = plain.predict(cond, acts, plain.horizon, generator=torch.Generator().manual_seed(0))
    b = guided.predict(cond, acts, plain.horizon, generator=torch.Generator().manual_seed(0))
    assert a.shape == b.shape and not torch.equal(a, b)
