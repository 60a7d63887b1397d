"""The ablation sweeps (Tables 3 and 4): each trial trains the preset's model with only the swept
settings changed, bad sweep definitions fail before Tune starts, trials scored on test leave records
that pool across jobs by sweep version, and the table builder pairs every variant with the reference
on the same windows and seeds. Synthetic scores stand in for trained models: no Ray cluster, seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import run_all, sweep
from pipeline.evaluate import EvalConfig
from models.config import config_from_dict
from workers.train_dit import TrainDiTConfig

# The Tables 3-4 sweep of the `gpu` preset (the entry for `pipeline/run_all.py:gpu()`'s `sweeps=`): on
# the job's collection and VAE, the reference, past + future actions and one-hot actions, three
# seeds each, every trial the preset's DiT (2,000 steps, T = 1, 2, 4) scored on the test windows of
# the job's own evaluation.
GPU_ABLATIONS = ("ablations", {"seeds": (0, 1, 2), "use_gpu": True, "eval_split": "test", "eval_max_windows": 256,
                               "eval_stride": 8, "eval_batch_size": 32, "eval_num_cpus": 4, "eval_lpips": True,
                               "eval_idm_steps": 2000, "eval_idm_max_pairs": 8192, "max_concurrent_trials": 1,
                               "trials_per_gpu": 1})
PATHS = {"run_dir": "/r", "data_root": "/d", "vae_path": "/v"}


def _sweep_config(preset: run_all.Preset, space: str, fields: dict, **paths) -> sweep.SweepConfig:
    """A preset's sweep entry as `run_all`'s sweep stage builds it."""
    return config_from_dict(sweep.SweepConfig, {"dit": dict(preset.dit), **fields, "space": space,
                                                **(paths or PATHS)})


def _entries():
    out = [("gpu", *GPU_ABLATIONS), ("gpu", "table3", {"seeds": (0, 1, 2), "use_gpu": True}),
           ("gpu", "table4", {"seeds": (0, 1, 2), "use_gpu": True})]
    out += [(name, space, fields) for name, make in run_all.PRESETS.items() for space, fields in make().sweeps]
    return out


@pytest.mark.parametrize("preset_name, space, fields", [pytest.param(*e, id=f"{e[0]}-{e[1]}") for e in _entries()])
def test_each_trial_trains_the_presets_model_with_only_the_swept_fields_changed(preset_name, space, fields):
    preset = run_all.PRESETS[preset_name]()
    cfg = _sweep_config(preset, space, fields)
    plan = sweep.plan_sweep(cfg, collected=preset.games)
    assert plan.trials
    # the sweep's DiT settings: the preset's own (a preset's sweep entry cannot carry a `dit`)
    assert "dit" not in fields
    job = dataclasses.asdict(config_from_dict(TrainDiTConfig, {**preset.dit, **PATHS}))
    swept = set(plan.fields) | {"seed", "game", "name"} | ({"horizon_choices"} if "horizon" in plan.fields else set())
    for params, trial in plan.trials:
        got = dataclasses.asdict(trial)
        assert {k: got[k] for k in job if k not in swept} == {k: job[k] for k in job if k not in swept}, params
        assert got["dit_preset"] == job["dit_preset"] and got["sample_steps"] == job["sample_steps"]
        if "horizon" in plan.fields:  # a swept generation length: the trial trains that one
            assert got["horizon_choices"] == () and got["horizon"] == params["horizon"]
    seeds = {t.seed for _, t in plan.trials}
    assert seeds == set(fields.get("seeds", (0, 1, 2)))


def test_gpu_ablations_are_three_variants_by_three_seeds_of_the_presets_S_model():
    preset = run_all.gpu()
    plan = sweep.plan_sweep(_sweep_config(preset, *GPU_ABLATIONS), collected=("Breakout",))
    got = sorted((t.action_mode, t.action_encoder, t.seed) for _, t in plan.trials)
    assert got == sorted((m, e, s) for m, e in (("future", "embedding"), ("past_future", "embedding"),
                                                ("future", "onehot")) for s in (0, 1, 2))
    assert {(t.dit_preset, t.steps, t.max_train_s, t.trained_horizons, t.use_gpu, t.game) for _, t in plan.trials} == {
        ("S", 2000, 0.0, (1, 2, 4), True, "Breakout")}
    assert plan.keys == ("action_mode", "action_encoder", "horizon")
    assert len({t.name for _, t in plan.trials}) == 9


def _gpu_cfg(tmp_path: Path, **fields) -> sweep.SweepConfig:
    space, base = GPU_ABLATIONS
    space = fields.pop("space", space)
    return _sweep_config(run_all.gpu(), space, {**base, **fields}, run_dir=str(tmp_path / "run"),
                         data_root=str(tmp_path / "data"), vae_path=str(tmp_path / "vae"))


@pytest.mark.parametrize("fields, message", [
    ({"overrides": {"variant": ["future+embedding", "future+one-hot"]}},
     r"variant='future\+one-hot' is not one of"),
    ({"space": "table3", "overrides": {"action_mode": ["future", "past"]}}, r"action_mode='past' is not one of"),
    ({"space": "table4", "overrides": {"action_encoder": ["one-hot"]}}, r"action_encoder='one-hot' is not one"),
    ({"overrides": {"horizn": [1, 2]}}, r"swept field 'horizn' is no TrainDiTConfig field"),
    ({"overrides": {"name": ["x"]}}, r"'name' is set by the sweep itself"),
    ({"overrides": {"dit_preset": "tiny"}}, r"overrides fix dit_preset='tiny', but .* have dit_preset='S'"),
    ({"overrides": {"sample_steps": 8}}, r"fix sample_steps=8, but .* have sample_steps=4"),
    ({"games": ("Pong",)}, r"game\(s\) \['Pong'\] have no episodes"),
    ({"use_gpu": False}, r"use_gpu=False, but .* use_gpu=True"),
    ({"dit": {**run_all.gpu().dit, "max_train_s": 600.0}}, r"step budgets, not clocks"),
    ({"dit": {**run_all.gpu().dit, "lr_cooldwn": 0.2}}, r"lr_cooldwn"),
])
def test_bad_sweeps_fail_before_tune_starts_naming_the_field(tmp_path, fields, message):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.pt").write_bytes(b"")
    (tmp_path / "data" / "episodes" / "game=Breakout").mkdir(parents=True)
    with pytest.raises(sweep.SweepError, match=message):
        sweep.main(_gpu_cfg(tmp_path, **fields))
    assert not (tmp_path / "run" / "tune").exists() and not (tmp_path / "run" / "sweeps").exists()


def test_trials_sharing_a_gpu_ask_for_their_share_and_a_game_named_twice_is_refused(tmp_path):
    from pipeline.train import worker_resources

    shared = _gpu_cfg(tmp_path, trials_per_gpu=2, max_concurrent_trials=2)
    plan = sweep.plan_sweep(shared, collected=("Breakout",))
    # the training workers and the scoring actor of each trial ask Ray for half a GPU; nothing else changes
    assert {worker_resources(t)["GPU"] for _, t in plan.trials} == {0.5}
    assert {sweep.trial_eval_config(shared, t, "").num_gpus for _, t in plan.trials} == {0.5}
    assert plan.version == sweep.plan_sweep(_gpu_cfg(tmp_path), collected=("Breakout",)).version
    assert worker_resources(dataclasses.replace(plan.trials[0][1], use_gpu=False)) == {"CPU": 4}
    with pytest.raises(ValueError, match="trials_per_gpu=0"):
        _gpu_cfg(tmp_path, trials_per_gpu=0)
    with pytest.raises(ValueError, match="gpus_per_worker=1.5"):
        TrainDiTConfig(gpus_per_worker=1.5)
    with pytest.raises(ValueError, match="num_gpus=0"):
        EvalConfig(num_gpus=0)
    cfg = _gpu_cfg(tmp_path, games=("Breakout",), overrides={"game": "Breakout"})
    with pytest.raises(sweep.SweepError, match="the game is set twice"):
        sweep.plan_sweep(cfg, collected=("Breakout",))
    with pytest.raises(sweep.SweepError, match="SweepConfig.dit sets game"):
        sweep.plan_sweep(_gpu_cfg(tmp_path, dit={**run_all.gpu().dit, "game": "Pong"}),
                         collected=("Breakout",))


def test_sweep_version_pools_seeds_games_splits_and_jobs_not_other_settings(tmp_path):
    v = sweep.sweep_version(_gpu_cfg(tmp_path))
    same = [dict(seeds=(3, 4)), dict(games=("Pong",)), dict(eval_split="val"), dict(max_concurrent_trials=2),
            dict(eval_batch_size=8, eval_num_cpus=1), dict(name="other"),
            dict(overrides={"variant": ["future+onehot"], "game": "Pong"}),  # a narrower grid elsewhere
            dict(dit={**run_all.gpu().dit, "num_workers": 2, "checkpoint_every": 500}),
            # the same settings as the command line gives them (JSON: lists for tuples)
            dict(dit=json.loads(json.dumps(run_all.gpu().dit)), overrides={"variant": ("future+onehot",)})]
    for fields in same:
        assert sweep.sweep_version(_gpu_cfg(tmp_path, **fields)) == v, fields
    other = [dict(dit={**run_all.gpu().dit, "steps": 4000}), dict(eval_max_windows=128),
             dict(eval_lpips=False), dict(space="table3"), dict(overrides={"horizon": [1, 2, 4]})]
    assert len({v, *(sweep.sweep_version(_gpu_cfg(tmp_path, **f)) for f in other)}) == 1 + len(other)
    # the version of a preset's sweep is computable from the code alone (the results tables use it)
    from pipeline.results import current_sweep_versions

    smoke = run_all.smoke()
    assert current_sweep_versions("smoke") == {sweep.sweep_version(sweep.preset_sweep_config(smoke, *smoke.sweeps[0])):
                                               "ablations"}
    assert sorted(current_sweep_versions("paper").values()) == ["table3", "table4"]  # not table2: no action setting


# -- trials scored on test: records and Tables 3 and 4 ------------------------------------------------
def _collection(rng, job: str, n_eps: int = 10, per: int = 4, frames: int = 4):
    """A job's collection: its held-out windows, and the part of every model's error that the truth
    decides."""
    eids = np.repeat([f"{job}.Breakout.e{i}~1.a" for i in range(n_eps)], per)
    starts = np.tile(np.arange(per) * 8, n_eps)
    hard = rng.gamma(2.0, 5.0, size=(n_eps * per, 1)) * np.linspace(1, 2, frames)
    return eids, starts, hard


def _trial_scores(rng, collection, shift: float, seed_noise: float, jitter: float = 0.0):
    """Scores of one trial trained for T = 1, 2, 4: the model's MSE is the windows' difficulty, plus
    the variant's `shift` exactly, plus the seed's own offset, plus uniform window noise of half-width
    `jitter`; copy-last is the same for every trial of the collection."""
    eids, starts, hard = collection
    n, H = hard.shape
    seed_noise = seed_noise + jitter * rng.uniform(-1, 1, size=(n, 1))
    model = hard * 0.5 + seed_noise + shift
    out = {"episode_id": eids, "start_step": starts, "copy_last/mse": hard, "model/mse": model}
    for T in (1, 2):
        out[f"model_T{T}/mse"] = hard[:, :T] * 0.45 + seed_noise + shift  # its own T-frame rollout
    for k in list(out):
        if k.endswith("/mse"):
            out[k.replace("/mse", "/psnr")] = 10 * np.log10(255 ** 2 / out[k])
            out[k.replace("/mse", "/lpips")] = out[k] / 1000
    label = rng.integers(0, 4, size=(n, H))
    out.update({"action_recorded/mse": model, "action_permuted/mse": model + 5, "action_noop/mse": model + 3,
                "action_permuted/differs": np.ones((n, H), bool), "action_noop/differs": np.ones((n, H), bool),
                "idm/label": label, "idm/real": label,
                "idm/generated": np.where(rng.random((n, H)) < 0.75 - shift / 10, label, (label + 1) % 4)})
    return out


SHIFT = {("future", "embedding"): 0.0, ("past_future", "embedding"): 2.0, ("future", "onehot"): 0.0}
JITTER = {("future", "onehot"): 1.0}  # as good as the reference on average, not window by window


def _record_trials(rng, cfg: sweep.SweepConfig, *, skip=(), split="test") -> tuple[sweep.SweepPlan, list[Path]]:
    """Each trial of a job's sweep recorded as `run_trial` records it, on synthetic scores: the trials
    of one job share its collection's windows."""
    plan = sweep.plan_sweep(cfg, collected=("Breakout",))
    coll = _collection(rng, Path(cfg.run_dir).name)
    seed_noise = {s: rng.uniform(0.5, 1.5) for s in cfg.seeds}
    records = []
    for params, dit in plan.trials:
        if (dit.action_mode, dit.action_encoder, dit.seed) in skip:
            continue
        variant = (dit.action_mode, dit.action_encoder)
        scores = _trial_scores(rng, coll, SHIFT[variant], seed_noise[dit.seed], jitter=JITTER.get(variant, 0.0))
        # every trial's rows come in another order: pairing goes by window key
        perm = rng.permutation(len(scores["episode_id"]))
        scores = {k: v[perm] for k, v in scores.items()}
        f = Path(cfg.run_dir) / "eval" / dit.name / "Breakout_scores.npz"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(f, **{k.replace("/", "__"): v for k, v in scores.items()})
        eval_cfg = EvalConfig(run_dir=cfg.run_dir, model_path="/m", games=("Breakout",), name=dit.name,
                              horizons=dit.trained_horizons, split=split, seed=dit.seed)
        records.append(sweep.record_trial(cfg, dit, eval_cfg, params, version=plan.version, fields=plan.fields,
                                          walls={"dit": 1.0, "evaluate": 1.0}, command="run_all --preset gpu"))
    return plan, records


def _setup(tmp_path: Path) -> sweep.SweepConfig:
    (tmp_path / "data" / "runs").mkdir(parents=True)
    (tmp_path / "data" / "runs" / "gpu.json").write_text(json.dumps({"config": {"steps_per_game": 120000,
                                                                                "data_root": str(tmp_path)}}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.json").write_text(json.dumps({"latent_channels": 8}))
    return _gpu_cfg(tmp_path)


def test_a_trial_record_names_its_variant_seed_and_sweep_version(tmp_path):
    from pipeline.results import TRIAL_KIND, load_run

    cfg = _setup(tmp_path)
    plan, records = _record_trials(np.random.default_rng(0), dataclasses.replace(cfg, seeds=(1,)))
    assert len(records) == 3
    meta, scores = load_run(records[1])
    assert meta["kind"] == TRIAL_KIND and meta["preset_version"] == meta["sweep"]["version"] == plan.version
    assert meta["seed"] == 1 and meta["split"] == "test" and meta["game"] == "Breakout"
    assert meta["variant"] in [{"action_mode": m, "action_encoder": e} for m, e in SHIFT]
    assert meta["horizons"] == meta["trained_horizons"] == [1, 2, 4] and meta["sweep"]["fields"] == [
        "action_mode", "action_encoder"]
    assert meta["settings"]["dit"]["dit_preset"] == "S" and meta["settings"]["evaluate"]["split"] == "test"
    assert meta["upstream"]["collection"] == [{"steps_per_game": 120000}]  # the collection's path is no setting
    assert meta["upstream"]["vae"] == {"latent_channels": 8} and len(meta["upstream_version"]) == 10
    assert {"commit", "gpu", "date", "command"} <= set(meta) and {"episode_id", "start_step"} <= set(scores)
    assert f"-{meta['variant']['action_mode']}-{meta['variant']['action_encoder']}-T1-2-4-s1-" in meta["run_id"]


def test_ablation_tables_pool_trials_of_several_jobs_and_pair_each_variant_with_the_reference(tmp_path):
    from pipeline.results import (ABLATION_COLUMNS, build_ablations, current_version, main, select_runs)

    cfg = _setup(tmp_path)
    rng = np.random.default_rng(1)
    # two jobs (two collections) of one sweep version: seeds 0-1 in one, seed 2 in the other, where
    # the one-hot variant did not run
    plan, first = _record_trials(rng, dataclasses.replace(cfg, seeds=(0, 1)))
    job2 = dataclasses.replace(cfg, seeds=(2,), run_dir=str(tmp_path / "run2"))
    _, second = _record_trials(rng, job2, skip={("future", "onehot", 2)})
    runs = tmp_path / "runs"
    runs.mkdir()
    for rec in first + second:
        (runs / rec.name).symlink_to(rec)
    # left out: a trial scored on val, one of another sweep version, and an older record of a trial
    _, val = _record_trials(rng, dataclasses.replace(cfg, seeds=(5,), run_dir=str(tmp_path / "v")),
                            split="val")
    _, old = _record_trials(rng, dataclasses.replace(cfg, seeds=(0,), eval_max_windows=9,
                                                               run_dir=str(tmp_path / "o")))
    for rec in val[:1] + old[:1]:
        (runs / rec.name).symlink_to(rec)
    out = tmp_path / "current"
    tables = build_ablations(runs, out, versions=[plan.version], n_boot=300)
    t3, t4 = tables["table3"], tables["table4"]
    assert list(pd.read_csv(out / "table3.csv").columns) == ABLATION_COLUMNS + ["reported", "diff_seeds"]

    pf = t3[(t3.method == "model") & (t3.variant == "past_future")].set_index("T")
    ref = t3[(t3.method == "model") & (t3.variant == "future")].set_index("T")
    assert list(pf.index) == list(ref.index) == [1, 2, 4]
    # past + future actions cost exactly 2 MSE on every window: paired on the same windows and seeds,
    # every resample's difference is 2 (rows lined up by row order would scatter it)
    assert (pf.diff_vs_reference - 2.0).abs().max() < 1e-9
    assert (pf.diff_ci_low - 2.0).abs().max() < 1e-9 and (pf.diff_ci_high - 2.0).abs().max() < 1e-9
    assert (pf.mse - ref.mse - 2.0).abs().max() < 1e-9  # each row pooled over the same three seeds
    assert (pf.seeds == 3).all() and pf.reported.all() and (pf.diff_seeds == 3).all()
    assert pf.episodes.iloc[0] == 10 and pf.windows.iloc[0] == 40
    assert ref.diff_vs_reference.isna().all()
    # the inverse-dynamics model reads the worse variant's frames less often right
    assert (pf.idm_acc_generated < ref.idm_acc_generated).all()
    copy = t3[t3.method == "copy_last"].set_index("T")
    assert list(copy.index) == [1, 2, 4] and (copy.diff_ci_low > 0).all()  # copy-last is worse than the model
    paper = t3[t3.method == "paper (other data)"]
    assert set(zip(paper.variant, paper["T"])) == {(v, T) for v in ("future", "past_future") for T in (1, 2, 4)}

    # Table 4: one-hot has two seeds: shown, not reported; its difference pairs those two seeds
    oh = t4[(t4.method == "model") & (t4.variant == "onehot")].set_index("T")
    assert (oh.seeds == 2).all() and not oh.reported.any() and (oh.diff_seeds == 2).all()
    assert (oh.diff_ci_low < 0.5).all() and (oh.diff_ci_high > -0.5).all() and (oh.diff_ci_high > oh.diff_ci_low).all()
    assert set(t4[t4.method == "model"].variant) == {"embedding", "onehot"}
    md = (out / "table4.md").read_text()
    assert "| Breakout | 4 | model | onehot |" in md and "2 (too few)" in md

    meta = json.loads((out / "table3.meta.json").read_text())
    assert len(meta["trials"]) == 6 and all(t["commit"] and t["gpu"] and t["date"] for t in meta["trials"])
    why = {r["run_id"]: r["why"] for r in meta["not_pooled"]}
    assert "split" in why[val[0].name] and "sweep version" in why[old[0].name]
    assert meta["reference"] == {"action_mode": "future", "action_encoder": "embedding"}
    assert len(json.loads((out / "table4.meta.json").read_text())["trials"]) == 5  # embedding 3, one-hot 2

    # a job's Table 2 never pools a trial
    _, left = select_runs(sorted(runs.iterdir()), "gpu", current_version("gpu"), False)
    assert all("sweep trial" in r["why"] for r in left)
    # the command line: the same tables; a version with no trial, named
    assert main(["ablations", "--runs", str(runs), "--out", str(tmp_path / "cli"), "--sweep-version", plan.version,
                 "--n-boot", "100"]) == 0
    assert (tmp_path / "cli" / "table3.csv").is_file() and (tmp_path / "cli" / "table4.meta.json").is_file()
    assert main(["ablations", "--runs", str(runs), "--out", str(tmp_path / "x"), "--sweep-version", "0000000000"]) == 2


def test_a_newer_record_of_a_trial_replaces_the_older_and_unpaired_seeds_are_named(tmp_path):
    from pipeline.results import build_ablations

    cfg = dataclasses.replace(_setup(tmp_path), seeds=(0,))
    rng = np.random.default_rng(2)
    plan, first = _record_trials(rng, cfg)
    # the same seed again, in another job (another collection): the newest record counts; its
    # past + future trial is on other windows than the reference kept from the first job
    job2 = dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"))
    _, again = _record_trials(rng, job2, skip={("future", "embedding", 0), ("future", "onehot", 0)})
    runs = tmp_path / "runs"
    runs.mkdir()
    for rec in first + again:
        (runs / rec.name).symlink_to(rec)
    tables = build_ablations(runs, tmp_path / "out", versions=[plan.version], n_boot=100)
    meta = json.loads((tmp_path / "out" / "table3.meta.json").read_text())
    assert any("an older record" in r["why"] for r in meta["not_pooled"])
    assert any("not paired" in n and "different windows" in n for n in meta["notes"])
    pf = tables["table3"].query("method == 'model' and variant == 'past_future'")
    assert pf.diff_vs_reference.isna().all() and (pf.seeds == 1).all()
    # a later job on a collection of other settings: its trials are the table now, the others are named
    (tmp_path / "data3" / "runs").mkdir(parents=True)
    (tmp_path / "data3" / "runs" / "gpu.json").write_text(json.dumps({"config": {"steps_per_game": 60000}}))
    job3 = dataclasses.replace(cfg, run_dir=str(tmp_path / "run3"), data_root=str(tmp_path / "data3"), seeds=(1,))
    _, third = _record_trials(rng, job3)
    for rec in third:
        (runs / rec.name).symlink_to(rec)
    tables = build_ablations(runs, tmp_path / "out", versions=[plan.version], n_boot=100)
    meta = json.loads((tmp_path / "out" / "table3.meta.json").read_text())
    assert {t["run_id"] for t in meta["trials"]} == {r.name for r in third if "-embedding-" in r.name}
    assert sum("collection/VAE settings" in r["why"] for r in meta["not_pooled"]) == 3


def test_no_ablation_sweep_in_a_preset_is_an_error_naming_the_option(tmp_path):
    from pipeline.results import ResultsError, build_ablations

    (tmp_path / "runs").mkdir()
    with pytest.raises(ResultsError, match="no recorded sweep trial"):
        build_ablations(tmp_path / "runs", tmp_path / "out", preset="smoke")
    preset = dataclasses.replace(run_all.smoke(), sweeps=())
    run_all.PRESETS["no-sweeps"] = lambda: preset
    try:
        with pytest.raises(ResultsError, match="--sweep-version"):
            build_ablations(tmp_path / "runs", tmp_path / "out", preset="no-sweeps")
    finally:
        del run_all.PRESETS["no-sweeps"]


# -- the sweep's own table ----------------------------------------------------------------------------
def test_trial_metrics_rows_and_aggregate_carry_every_generation_length_and_the_action_measures():
    gl = pd.DataFrame([{"method": m, "generation_length": T, "mse": 10.0 * T + (m == "copy_last"), "psnr": 30.0}
                       for m in ("model", "copy_last") for T in (1, 2, 4)])
    af = pd.DataFrame([{"T": T, "dpsnr_vs_permuted": 1.5, "idm_acc_generated": 0.6, "dpsnr_vs_noop": np.nan}
                       for T in (1, 2, 4)])
    metrics = sweep._trial_metrics({"generation_length": gl, "action_fidelity": af}, (1, 2, 4))
    assert metrics["T2/model/mse"] == 20.0 and metrics["T4/action/idm_acc_generated"] == 0.6
    assert "T1/action/dpsnr_vs_noop" not in metrics  # no such windows: no number rather than NaN

    cfg = _sweep_config(run_all.gpu(), *GPU_ABLATIONS)
    plan = sweep.plan_sweep(cfg, collected=("Breakout",))
    results = [(params, {**metrics, "T2/model/mse": 20.0 + dit.seed + (dit.action_encoder == "onehot")})
               for params, dit in plan.trials]
    rows = sweep.trial_rows(plan, cfg, results)
    assert len(rows) == 9 * 3 and set(rows.horizon) == {1, 2, 4}
    assert {"action_mode", "action_encoder", "seed", "trial", "action/idm_acc_generated"} <= set(rows.columns)
    table = sweep.aggregate(rows, plan.keys)
    oh = table[(table.method == "model") & (table.action_encoder == "onehot") & (table.horizon == 2)].iloc[0]
    assert oh.mse == pytest.approx(22.0) and oh.mse_std == pytest.approx(1.0) and oh.seeds == 3
    assert oh.idm_acc_generated == pytest.approx(0.6)
    assert table[table.method == "copy_last"].idm_acc_generated.isna().all()
    md = sweep.to_markdown(table, plan.keys)
    assert "| future | onehot | 2 | model | 22.00 ± 1.00 | 30.00 ± 0.00 | 1.50 ± 0.00 | 0.600 ± 0.000 | 3 |" in md


def test_ablations_command_answers_help(capsys):
    from pipeline.results import main

    with pytest.raises(SystemExit) as exit_:
        main(["ablations", "--help"])
    assert exit_.value.code == 0 and "--sweep-version" in capsys.readouterr().out


def test_set_sweep_reaches_every_sweep_and_a_sweep_cannot_carry_its_own_dit():
    from pipeline.presets.base import Preset, with_overrides

    gpu = run_all.gpu()
    part = with_overrides(gpu, ("sweep.seeds=[2]", 'sweep.overrides={"variant": ["future+onehot"]}',
                                "dit.lr=0.001"))
    cfg = _sweep_config(part, *part.sweeps[0])
    plan = sweep.plan_sweep(cfg, collected=("Breakout",))
    assert [(t.action_encoder, t.seed, t.lr) for _, t in plan.trials] == [("onehot", 2, 0.001)]
    # one grid split over jobs pools: the narrowed sweep keeps the full sweep's version (dit.lr aside)
    assert plan.version == sweep.sweep_version(_sweep_config(with_overrides(gpu, ("dit.lr=0.001",)), *gpu.sweeps[0]))
    for bad, message in (("sweep.dit={}", "change it with --set dit"), ("sweep.run_dir=/x", "sets sweep.run_dir"),
                         ("sweep.seedz=[1]", "no field 'seedz'"), ("sweep.space=table9", "sets sweep.space")):
        with pytest.raises(SystemExit, match=message):
            with_overrides(gpu, (bad,))
    with pytest.raises(SystemExit, match="sweep.overrides.*must be a dict"):
        with_overrides(gpu, ("sweep.overrides=[1]",))
    # every sweep of a preset of several (paper: Tables 2, 3 and 4) takes the setting, and each is checked
    paper = run_all.paper()
    assert len(paper.sweeps) > 1
    assert [f["seeds"] for _, f in with_overrides(paper, ("sweep.seeds=[4]",)).sweeps] == [[4]] * len(paper.sweeps)
    with pytest.raises(SystemExit, match="sweep 'table3': .*set both directly and by 'variant'"):
        with_overrides(paper, ('sweep.overrides={"variant": ["future+onehot"]}',))
    with pytest.raises(SystemExit, match="3 sweeps, which one name would merge"):
        with_overrides(paper, ("sweep.name=x",))
    with pytest.raises(ValueError, match="sweep 'ablations' sets \\['dit'\\]: a preset's sweep trains the preset's own"):
        Preset(games=("Pong",), collect={}, vae={}, dit={}, evaluate={}, sweeps=(("ablations", {"dit": {"steps": 6}}),))


def _job_record(run_dir: Path, preset: run_all.Preset, seed: int, **changes) -> Path:
    """A job's evaluation record as `run_all` writes it (`settings` = the seed's resolved preset)."""
    from pipeline.presets.base import resolved_settings, with_seed

    settings = resolved_settings(with_seed(preset, seed))
    for key, value in changes.items():
        section, field = key.split(".")
        settings[section][field] = value
    tag = "".join(f"-{k}{v}" for k, v in changes.items())
    eval_dir = run_dir / "eval" / f"eval-Breakout-seed{seed}{tag}"
    eval_dir.mkdir(parents=True)
    (eval_dir / "Breakout_scores.npz").write_bytes(b"")
    rec = run_dir / "results" / f"gpu-v-Breakout-s{seed}{tag}"
    rec.mkdir(parents=True)
    (rec / "run.json").write_text(json.dumps({"run_id": rec.name, "preset": "gpu", "game": "Breakout", "seed": seed,
                                              "split": "test", "settings": settings, "eval_dir": str(eval_dir),
                                              "inputs_digest": sweep.inputs_digest(str(run_dir / "data"),
                                                                                   str(run_dir / "vae"))},
                                             default=list))
    return rec


def test_the_jobs_own_evaluations_stand_for_the_reference_trials_scored_alike(tmp_path, capsys):
    """A job that trained seeds 0 and 1 of the preset's DiT need not train the sweep's reference
    trials of those seeds again; a record whose DiT or scoring differs stands for nothing."""
    gpu = run_all.gpu()
    paths = {"run_dir": str(tmp_path), "data_root": str(tmp_path / "data"), "vae_path": str(tmp_path / "vae")}
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.pt").write_bytes(b"the job's VAE")
    records = [_job_record(tmp_path, gpu, 0), _job_record(tmp_path, gpu, 1),
               _job_record(tmp_path, gpu, 2, **{"dit.steps": 1000}),
               _job_record(tmp_path, gpu, 2, **{"evaluate.max_windows": 64})]
    cfg = dataclasses.replace(_sweep_config(gpu, *GPU_ABLATIONS, **paths),
                              reference_records=tuple(map(str, records)))
    plan = sweep.plan_sweep(cfg, collected=("Breakout",))
    by_name = {t.name: t for _, t in plan.trials}
    assert {(by_name[n].action_mode, by_name[n].action_encoder, by_name[n].seed, r["run_id"])
            for n, r in plan.reused.items()} == {("future", "embedding", 0, records[0].name),
                                                 ("future", "embedding", 1, records[1].name)}
    out = capsys.readouterr().out
    assert f"{records[2].name} stands for no trial: its DiT differs in steps (1000 vs 2000)" in out
    assert f"{records[3].name} stands for no trial: scored differently: max_windows (64 vs 256)" in out
    # the seed's evaluation on the other policy's play is not the trial's test set
    other = _job_record(tmp_path, gpu, 2, **{"evaluate.name": "other"})
    meta = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**meta, "test_set": "other_policy"}))
    ref2 = next(t for _, t in plan.trials if (t.action_encoder, t.seed, t.action_mode) == ("embedding", 2, "future"))
    assert sweep.reuse_mismatch(cfg, ref2, json.loads((other / "run.json").read_text())) == \
        "scored on the other_policy test set, not the collection's"
    assert sweep.reuse_mismatch(cfg, ref2, meta) is None  # the same record as the collection's would serve
    # a VAE trained again since (`--force vae`): the job's evaluations were of another VAE
    (tmp_path / "vae" / "vae.pt").write_bytes(b"another VAE")
    assert sweep.plan_sweep(cfg, collected=("Breakout",)).reused == {}
    assert "another collection or VAE than the sweep's" in capsys.readouterr().out
    (tmp_path / "vae" / "vae.pt").write_bytes(b"the job's VAE")
    # scored on val, the trials are not the job's test evaluation
    val = sweep.plan_sweep(dataclasses.replace(cfg, eval_split="val"), collected=("Breakout",))
    assert val.reused == {}
    elsewhere = _job_record(tmp_path / "other", gpu, 0)
    with pytest.raises(sweep.SweepError, match="is not under .*: only the job's own evaluations"):
        sweep.plan_sweep(dataclasses.replace(cfg, reference_records=(str(elsewhere),)), collected=("Breakout",))
