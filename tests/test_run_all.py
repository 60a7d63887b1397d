"""The job's stage bookkeeping, the sweep's table aggregation, the presets, and the world model's
choice of chunk length; no cluster needed (the whole job runs in tests/test_job.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import evaluate, run_all, sweep
from pipeline.cluster import require_lpips_weights
from pipeline.collect import CollectConfig
from pipeline.evaluate import EvalConfig
from pipeline.presets import with_overrides
from workers.rollout import AgentConfig
from models.config import config_from_dict
from workers.train_dit import TrainDiTConfig, build_dit
from workers.train_vae import TrainVAEConfig
from workers.world_model import WorldModel
from models.vae import VAE_models


def _lands_as_given(cfg, fields: dict) -> None:
    """Every setting a preset names reaches the stage's config unchanged (lists and tuples alike)."""
    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    for k, v in fields.items():
        assert norm(getattr(cfg, k)) == norm(v), (type(cfg).__name__, k, getattr(cfg, k), v)


@pytest.mark.parametrize("name", sorted(run_all.PRESETS))
def test_every_preset_builds_valid_stage_configs(name):
    from pipeline.imagine import ImagineConfig

    p = run_all.PRESETS[name]()
    c = dict(p.collect)
    agent = c.pop("agent", {})
    collect = CollectConfig(games=p.games, agent=AgentConfig(**agent), **c)
    _lands_as_given(collect, c)
    _lands_as_given(collect.agent, agent)
    _lands_as_given(config_from_dict(TrainVAEConfig, p.vae), p.vae)
    dit = config_from_dict(TrainDiTConfig, p.dit)
    _lands_as_given(dit, p.dit)
    assert sum(x.numel() for x in build_dit(dit, 8).parameters()) > 0
    _lands_as_given(config_from_dict(EvalConfig, p.evaluate), p.evaluate)
    _lands_as_given(config_from_dict(ImagineConfig, p.imagine), p.imagine)
    for space, fields in p.sweeps:
        _lands_as_given(config_from_dict(sweep.SweepConfig, {**fields, "space": space}), fields)


def test_completed_stage_is_reused_and_a_failing_stage_is_named(tmp_path):
    calls = []
    first = run_all._run_stage(tmp_path, "vae", set(), lambda: calls.append(1) or {"vae_path": "/x"})
    again = run_all._run_stage(tmp_path, "vae", set(), lambda: calls.append(2) or {"vae_path": "/y"})
    assert calls == [1] and again["vae_path"] == "/x" == first["vae_path"]
    forced = run_all._run_stage(tmp_path, "vae", {"vae"}, lambda: calls.append(3) or {"vae_path": "/z"})
    assert calls == [1, 3] and forced["vae_path"] == "/z"

    def boom():
        raise FileNotFoundError("no episodes under /data")

    with pytest.raises(run_all.StageFailed, match=r"stage 'dit' failed: FileNotFoundError: no episodes"):
        run_all._run_stage(tmp_path, "dit", set(), boom)
    assert not (tmp_path / "stages" / "dit.json").exists()  # a failed stage is not marked done
    assert json.loads((tmp_path / "stages" / "vae.json").read_text())["vae_path"] == "/z"
    run_all._run_stage(tmp_path, "dit", set(), lambda: {"model_path": "/m"}, {"max_train_s": 720})
    assert json.loads((tmp_path / "stages" / "dit.json").read_text())["settings"] == {"max_train_s": 720}


def test_set_replaces_single_preset_settings_and_names_bad_ones():
    base = run_all.PRESETS["gpu"]()
    p = run_all.with_overrides(base, ("vae.latent_channels=16", "dit.horizon_choices=[1, 4]",
                                      "collect.agent.train_steps=8000", "evaluate.name=eval-c16",
                                      "dit.bf16=false"))
    assert p.vae["latent_channels"] == 16 and base.vae["latent_channels"] == 8  # the preset is not mutated
    assert p.vae["steps"] == base.vae["steps"] and p.dit == {**base.dit, "horizon_choices": [1, 4], "bf16": False}
    assert config_from_dict(TrainDiTConfig, p.dit).horizon_choices == (1, 4) and p.dit["bf16"] is False
    assert p.collect["agent"]["train_steps"] == 8000
    assert p.collect["agent"]["learner_device"] == base.collect["agent"]["learner_device"]
    assert p.evaluate["name"] == "eval-c16"  # not JSON: taken as a string
    with pytest.raises(SystemExit, match="TrainVAEConfig has no field 'latent_chanels'"):
        run_all.with_overrides(base, ("vae.latent_chanels=16",))
    with pytest.raises(SystemExit, match="unknown section 'model'"):
        run_all.with_overrides(base, ("model.width=512",))
    with pytest.raises(SystemExit, match="expected section.field=value"):
        run_all.with_overrides(base, ("vae.latent_channels",))
    with pytest.raises(SystemExit, match="AgentConfig has no field 'steps'"):
        run_all.with_overrides(base, ("collect.agent.steps=5",))
    # Every --set counts, whether its settings share one flag or each has its own.
    args = run_all._parse(["--set", "vae.spatial_downsample=2", "--set", "dit.patch_size=[1,8,8]", "dit.bf16=false"])
    assert args.sets == ["vae.spatial_downsample=2", "dit.patch_size=[1,8,8]", "dit.bf16=false"]
    assert run_all._parse([]).sets == []


def test_unknown_preset_and_stage_are_rejected():
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        run_all.main("huge")
    with pytest.raises(SystemExit, match=r"unknown stage\(s\) \['train'\]"):
        run_all.main("smoke", stages=("collect", "train"))


def test_missing_lpips_weights_stop_a_job_before_it_trains_what_it_could_not_score(ray_local, tiny_split_root,
                                                                                    tmp_path, monkeypatch):
    from models.lpips import weights_path

    session_weights = weights_path()  # what the Ray workers of this session read
    absent = tmp_path / "absent" / "lpips.pt"
    monkeypatch.setenv("AWM_LPIPS_WEIGHTS", str(absent))

    def ran(*_, **__):
        raise AssertionError("went past the check")

    for module, name in ((run_all.collect, "main"), (evaluate, "load_world_model"), (sweep, "Tracker")):
        monkeypatch.setattr(module, name, ran)
    out = tmp_path / "out"
    not_found = "LPIPS AlexNet weights not found at " + re.escape(str(absent))
    with pytest.raises(SystemExit, match=r"\['evaluate-seed2'\] score LPIPS: " + not_found):
        run_all.main("smoke", str(out), stages=("collect", "vae", "dit", "evaluate"), seed=(2,))
    assert not (out / "stages").exists()  # no stage started

    need = run_all._require_scoring_weights  # which stages would score: each case is cheap to ask
    smoke = run_all.smoke()
    need(out, smoke, ("collect", "vae", "dit", "imagine", "bench"), set(), (2,))  # nothing scores
    with pytest.raises(SystemExit, match=r"\['evaluate-other-policy-seed2'\]"):  # the other policy's play
        need(out, smoke, ("other_policy",), set(), (2,))
    need(out, with_overrides(smoke, ("evaluate.lpips=false",)), ("other_policy",), set(), (2,))
    need(out, with_overrides(smoke, ("sweep.eval_lpips=false",)), ("sweep",), set(), (None,))  # scores no LPIPS
    with pytest.raises(SystemExit, match=r"\['sweep'\]"):
        need(out, smoke, ("sweep",), set(), (None,))
    need(out, with_overrides(smoke, ("evaluate.lpips=false",)), ("evaluate",), set(), (2,))
    with pytest.raises(SystemExit, match=r"\['sweep'\]"):
        need(out, run_all.gpu(), ("sweep",), set(), (None,))
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "evaluate-seed2.json").write_text("{}")
    need(out, smoke, ("evaluate",), set(), (2,))  # completed: reused, not scored again
    with pytest.raises(SystemExit, match=r"\['evaluate-seed3'\]"):  # seed 3 has not been scored
        need(out, smoke, ("evaluate",), set(), (2, 3))
    with pytest.raises(SystemExit, match=r"\['evaluate-seed2'\]"):  # forced: scored again
        need(out, smoke, ("evaluate",), {"evaluate"}, (2,))

    # The stages' own entry points check it too, before they load, train or score anything.
    with pytest.raises(FileNotFoundError, match=not_found):
        evaluate.main(EvalConfig(run_dir=str(tmp_path), model_path=str(tmp_path)))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=not_found):
        sweep.main(sweep.SweepConfig(run_dir=str(tmp_path), vae_path=str(tmp_path / "vae"), space="table3",
                                     data_root=tiny_split_root, seeds=(0,), overrides={"game": "Breakout"}))

    # On a cluster of several nodes the scoring actors read their own node's file: a task asks one.
    # This cluster's workers kept the session's environment, where the weights exist, so only this
    # process lacks the file and the check passes.
    assert session_weights.is_file(), f"no LPIPS weights at {session_weights}: run scripts/setup_lpips.py"
    monkeypatch.setattr(ray_local, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    require_lpips_weights()


def test_sweep_aggregates_mean_and_std_over_seeds():
    rows = []
    for mode, base in (("future", 10.0), ("past_future", 20.0)):
        for seed, noise in ((0, -1.0), (1, 1.0)):
            rows.append({"action_mode": mode, "horizon": 4, "seed": seed, "model/mse": base + noise,
                         "model/psnr": 30.0 + noise, "copy_last/mse": 50.0, "copy_last/psnr": 25.0})
    table = sweep.aggregate(pd.DataFrame(rows), ("action_mode", "horizon"))
    fut = table[(table.method == "model") & (table.action_mode == "future")].iloc[0]
    assert fut["mse"] == pytest.approx(10.0) and fut["mse_std"] == pytest.approx(np.std([9.0, 11.0], ddof=1))
    assert fut["seeds"] == 2
    copy = table[(table.method == "copy_last") & (table.action_mode == "past_future")].iloc[0]
    assert copy["mse"] == 50.0 and copy["mse_std"] == 0.0
    md = sweep.to_markdown(table, ("action_mode", "horizon"))
    assert "| future | 4 | model | 10.00 ± 1.41 |" in md and md.count("copy_last") == 2


def test_sweep_config_rejects_unknown_space_and_settings_not_a_dict():
    with pytest.raises(ValueError, match="known spaces"):
        sweep.SweepConfig(space="table9")
    with pytest.raises(ValueError, match="SweepConfig.overrides must be a dict"):
        sweep.SweepConfig(overrides=[1, 2])
    with pytest.raises(ValueError, match="SweepConfig.dit must be a dict"):
        sweep.SweepConfig(dit='{"steps": 12}')  # settings, not their JSON text


def test_dit_config_checks_horizon_choices():
    with pytest.raises(ValueError, match="horizon_choices"):
        TrainDiTConfig(horizon=2, horizon_choices=(1, 4))
    assert TrainDiTConfig(horizon=4, horizon_choices=(4, 1, 2)).trained_horizons == (1, 2, 4)
    assert TrainDiTConfig(horizon=2).trained_horizons == (2,)


def _world_model(trained: tuple[int, ...]) -> tuple[WorldModel, list[int]]:
    torch.manual_seed(0)
    vae = VAE_models["tiny"]()
    cfg = TrainDiTConfig(dit_preset="tiny", horizon=4, horizon_choices=trained)
    dit = build_dit(cfg, vae.cfg.latent_channels)
    seen: list[int] = []  # latent frames of every DiT call
    dit.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    from models.rectified_flow import EulerSamplerConfig

    wm = WorldModel(vae, dit, latent_scale=1.0, n_cond=4, horizon=4, action_mode="future",
                    sampler=EulerSamplerConfig(num_steps=1), trained_horizons=trained)
    return wm, seen


def test_world_model_generates_a_trained_length_in_one_chunk_and_chains_others():
    cond = torch.randint(0, 255, (1, 4, 24, 16, 3), dtype=torch.uint8)
    wm, seen = _world_model((1, 2, 4))
    assert wm.predict(cond, torch.zeros(1, 1, dtype=torch.long), 1).shape == (1, 1, 24, 16, 3)
    assert seen == [5]  # 4 condition + 1 generated latent frames: one chunk of exactly 1
    seen.clear()
    assert wm.predict(cond, torch.zeros(1, 6, dtype=torch.long), 6).shape == (1, 6, 24, 16, 3)
    assert seen == [8, 8]  # not trained for 6: two chunks of 4, the extra frames dropped
    seen.clear()
    wm.chunk = 1  # single-step rollout on the same weights
    wm.predict(cond, torch.zeros(1, 3, dtype=torch.long), 3)
    assert seen == [5, 5, 5]

    wm4, seen4 = _world_model(())
    wm4.predict(cond, torch.zeros(1, 1, dtype=torch.long), 1)
    assert seen4 == [8]  # a T=4-only model generates 4 and keeps the first
    wm4.chunk = 1
    with pytest.raises(ValueError, match="not a trained generation length"):
        wm4.predict(cond, torch.zeros(1, 1, dtype=torch.long), 1)


def test_ema_warms_up_then_holds_its_decay():
    from workers.train_common import EMA

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    start = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=0)  # early: the average moves 90% of the way to the weights
    assert torch.allclose(ema.model.weight, 0.1 * start + 0.9 * net.weight)
    before = ema.model.weight.clone()
    ema.update(net, step=10**6)  # late: the configured decay
    assert torch.allclose(ema.model.weight, 0.999 * before + 0.001 * net.weight)


def test_init_ray_starts_a_local_cluster_instead_of_joining_a_dead_one(tmp_path):
    """A killed `ray start` leaves its address in ray_current_cluster; a bare ray.init() would try
    to join that dead cluster and fail. init_ray checks it and starts a local cluster, saying so."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    from pipeline.cluster import reachable

    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        s.listen()
        assert reachable(dead)
    assert not reachable(dead)

    ray_tmp = tempfile.mkdtemp(prefix="awm-", dir="/tmp")  # short: Ray's socket paths have a limit
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(dead)
        code = ("from pipeline.cluster import init_ray; import ray; "
                "init_ray(num_cpus=1, include_dashboard=False); "
                "print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = ray_tmp
        res = subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).resolve().parents[1]),
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"the cluster recorded at {dead} is not running" in res.stdout
        assert "CPUS 1.0" in res.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_several_seeds_share_the_collection_and_vae_and_record_their_own_dit(tmp_path, monkeypatch):
    """`--seed 0 1`: one collection, one VAE (the first seed's), a DiT, evaluation and record per
    seed; a later `--seed 2` in the same folder reuses the VAE and trains a third DiT. The stage
    bodies are replaced by recorders: what is checked is the job's bookkeeping."""
    import ray

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(run_all.collect, "main", lambda cfg: calls.append(("collect", None)) or {"games": {}})

    def vae(cfg, tracking_uri=None):
        calls.append(("vae", cfg.seed))
        return tmp_path / "vae"

    def dit(cfg, tracking_uri=None):
        calls.append(("dit", (cfg.seed, cfg.name)))
        return tmp_path / cfg.name

    def evaluate_main(cfg, tracking_uri=None):
        calls.append(("evaluate", (cfg.seed, cfg.model_path)))
        d = Path(cfg.run_dir) / "eval" / cfg.name
        d.mkdir(parents=True)
        np.savez(d / "Breakout_scores.npz", episode_id=np.array(["e"]), start_step=np.array([0]))
        return {"generation_length": pd.DataFrame({"mse": [1.0]})}

    def imagine_main(cfg, tracking_uri=None):
        calls.append(("imagine", (cfg.seed, cfg.model_path, cfg.name)))
        d = Path(cfg.run_dir) / "imagine" / cfg.name
        d.mkdir(parents=True)
        np.savez(d / "returns.npz", imagination__returns=np.array([float(cfg.seed)]))
        table = pd.DataFrame({"agent": ["imagination"], "return_mean": [float(cfg.seed)]})
        table.to_csv(d / "imagination.csv", index=False)
        return {"imagination": table}

    monkeypatch.setattr(run_all, "train_vae_main", vae)
    monkeypatch.setattr(run_all, "train_dit_main", dit)
    monkeypatch.setattr(run_all.evaluate, "main", evaluate_main)
    monkeypatch.setattr(run_all.imagine, "main", imagine_main)
    stages = ("collect", "vae", "dit", "evaluate", "imagine")
    out = run_all.main("smoke", str(tmp_path), stages=stages, games=("Breakout",), seed=(3, 5))
    assert [c[0] for c in calls] == ["collect", "vae", "dit", "evaluate", "imagine", "dit", "evaluate", "imagine"]
    assert calls[1] == ("vae", 3)
    assert calls[2][1] == (3, "dit-Breakout-seed3") and calls[5][1] == (5, "dit-Breakout-seed5")
    assert calls[6][1] == (5, str(tmp_path / "dit-Breakout-seed5"))  # each seed scores its own DiT
    assert calls[7][1] == (5, str(tmp_path / "dit-Breakout-seed5"), "imagine-Breakout-seed5")  # and plays in it
    assert {"dit-seed3", "dit-seed5", "evaluate-seed5"} <= set(out)
    records = {json.loads(p.read_text())["seed"]: json.loads(p.read_text())
               for p in (tmp_path / "results").glob("*/run.json")}
    assert sorted(records) == [3, 5]
    assert records[5]["settings"]["vae"]["seed"] == 3 and records[5]["settings"]["dit"]["seed"] == 5
    for rec in (tmp_path / "results").glob("*/run.json"):  # each seed's returns and imagine settings in its record
        seed = json.loads(rec.read_text())["seed"]
        with np.load(rec.parent / "imagine_returns.npz") as z:
            assert z["imagination__returns"].tolist() == [float(seed)]
        assert json.loads((rec.parent / "imagine.json").read_text())["imagine_version"] == \
            run_all.imagine_version(run_all.PRESETS["smoke"]())
    calls.clear()
    run_all.main("smoke", str(tmp_path), stages=stages, games=("Breakout",), seed=(7,))
    assert [c[0] for c in calls] == ["dit", "evaluate", "imagine"]  # collection and VAE reused
    rec7 = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*-s7-*/run.json")]
    assert len(rec7) == 1 and rec7[0]["settings"]["vae"]["seed"] == 3
    calls.clear()
    run_all.main("smoke", str(tmp_path), stages=stages, games=("Breakout",), seed=(7,), force=("dit",))
    assert [c[0] for c in calls] == ["dit"]  # --force dit redoes the seed's DiT; its evaluation stays
    assert run_all._parse(["--seed", "0", "1", "2"]).seed == [0, 1, 2]
    with pytest.raises(SystemExit, match="distinct"):
        run_all.main("smoke", str(tmp_path), stages=stages, seed=(1, 1))


def test_bench_stage_measures_each_seeds_trained_world_model(tiny_trained, tiny_split_root, tmp_path):
    """`--bench generate env` after a seed's DiT: both benchmarks run on the trained model and the
    run's data, their tables land in <out>/bench/, in the stage's marker and in MLflow; a rerun
    reuses the stage unless it asks for a benchmark the marker lacks or `--force bench`; a missing
    DiT, an unknown benchmark and `--stages bench` alone are named."""
    import mlflow

    _, model_path, _ = tiny_trained
    (tmp_path / "data").symlink_to(tiny_split_root)
    marker = tmp_path / "stages" / "dit-seed4.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"model_path": str(model_path)}))
    run_all.main("smoke", str(tmp_path), stages=("bench",), games=("Breakout",), seed=(4,), bench=("generate",))
    out = run_all.main("smoke", str(tmp_path), stages=("bench",), games=("Breakout",), seed=(4,),
                       bench=("generate", "env"))  # env was not measured: the stage runs again
    recorded = json.loads((tmp_path / "stages" / "bench-seed4.json").read_text())
    files = recorded["files"]
    assert out["bench-seed4"]["files"] == files and set(files) == {"generate", "env"}
    assert recorded["settings"] == {"bench": ["generate", "env"]}
    assert {Path(f).parent for f in files.values()} == {tmp_path / "bench"}
    gen = pd.read_csv(files["generate"])
    assert sorted(gen.batch) == [1, 4] and (gen.frames_per_s > 0).all()
    assert set(gen.sample_steps) == {json.loads((Path(model_path) / "world_model.json").read_text())["sample_steps"]}
    env = pd.read_csv(files["env"])
    assert set(env.heads) == {"off"}  # the model has no heads before the imagine stage
    assert set(env["T"]) == {1, 2} and (env.steps_per_s > 0).all()  # T = 1 and the longest trained length
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("atari-world-model").experiment_id],
                              filter_string="tags.mlflow.runName = 'bench-Breakout-seed4'")
    assert len(runs) == 1 and runs[0].data.tags["benchmarks"] == "generate,env"
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "bench")}
    assert {"bench/generate-Breakout-seed4.csv", "bench/env-Breakout-seed4.csv", "bench/env.json"} <= logged

    first = (tmp_path / "stages" / "bench-seed4.json").read_text()
    run_all.main("smoke", str(tmp_path), stages=("bench",), games=("Breakout",), seed=(4,), bench=("generate",))
    assert (tmp_path / "stages" / "bench-seed4.json").read_text() == first  # covered: reused
    again = run_all.main("smoke", str(tmp_path), stages=("bench",), games=("Breakout",), seed=(4,),
                         bench=("generate",), force=("bench",))
    assert set(again["bench-seed4"]["files"]) == {"generate"}
    with pytest.raises(run_all.StageFailed, match="no trained DiT.*dit-seed9"):
        run_all.main("smoke", str(tmp_path), stages=("bench",), games=("Breakout",), seed=(9,), bench=("generate",))
    with pytest.raises(SystemExit, match="unknown.*'speed'"):
        run_all.main("smoke", str(tmp_path), stages=("bench",), bench=("speed",))
    with pytest.raises(SystemExit, match="--stages bench measures what --bench names"):
        run_all.main("smoke", str(tmp_path), stages=("bench",))
