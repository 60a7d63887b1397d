"""The whole job as users start it: a real `ray start --head` cluster, `ray job submit
--working-dir .`, the smoke preset, logging over HTTP to a real MLflow server; everything is then
checked through MLflow's REST API and the files the job wrote.

The job takes several minutes on 2 cores (it runs every stage, including a small Tune sweep). It
runs alone: overlapping it with the other tests on 2 cores made the whole suite slower, not faster."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cluster import REPO, head_agent_log, submit_job


def _get(base: str, endpoint: str, **params) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(params)}" if params else f"{base}{endpoint}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _artifact_paths(base: str, run_id: str, path: str = "") -> set[str]:
    """Every artifact file under `path` of a run, listed recursively through the REST API."""
    listing = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path)
    out: set[str] = set()
    for f in listing.get("files", []):
        out |= _artifact_paths(base, run_id, f["path"]) if f["is_dir"] else {f["path"]}
    return out


def _check_outputs(out: Path, mlflow_server: str) -> None:
    """What one smoke job must leave: files under --out, runs, metrics, tables and artifacts in MLflow."""
    # Files: every stage completed, under the absolute --out (not the job's temporary copy).
    for stage in ("collect", "vae", "dit", "evaluate", "collect-other-policy", "evaluate-other-policy", "imagine",
                  "sweep"):
        assert (out / "stages" / f"{stage}.json").is_file(), f"stage {stage} left no marker"
    assert list((out / "data" / "episodes").glob("game=Breakout/run=smoke/*.parquet"))
    eval_csv = (out / "eval" / "eval-Breakout" / "generation_length.csv").read_text().splitlines()
    # model, copy-last and the VAE's reconstruction, at generation lengths 1, 2 and 4
    assert eval_csv[0].startswith("game,method,generation_length") and len(eval_csv) == 1 + 3 * 3
    assert {line.split(",")[1] for line in eval_csv[1:]} == {"model", "copy_last", "vae_recon"}
    # The evaluation's record (pipeline/results.py) pools into the results tables, with the action tests
    from pipeline.results import build_tables, load_run

    found = {r: load_run(r)[0].get("test_set") for r in (out / "results").glob("smoke-*-Breakout-s0-*")}
    records = [r for r, test_set in found.items() if test_set == "test"]
    assert sorted(found.values()) == ["other_policy", "test"], found  # the collection's, the other policy's
    meta, scores = load_run(records[0])
    assert (meta["preset"], meta["split"], meta["seed"]) == ("smoke", "test", 0) and meta["stage_wall_s"]["dit"] > 0
    assert {"action_recorded/mse", "action_permuted/mse", "action_noop/differs", "episode_id"} <= set(scores)
    table2 = build_tables(out / "results", out / "current", "smoke", n_boot=200)
    assert set(table2.method) >= {"model", "copy_last"} and (table2.seeds.dropna() == 1).all()
    import pandas as pd

    # The other policy's play: its own data root, never the training data's; scored by the seed's
    # model, its action-fidelity rows apart from the collection's, and no Table 2 row.
    assert list((out / "data_other_policy" / "episodes").glob("game=Breakout/run=smoke-other-policy/*.parquet"))
    assert {p.name for p in (out / "data" / "episodes" / "game=Breakout").iterdir()} == {"run=smoke"}
    af = pd.read_csv(out / "current" / "action_fidelity.csv")
    assert set(af.test_set) == {"test", "other_policy"}, af
    assert (out / "eval" / "eval-Breakout-other-policy" / "generation_length.csv").is_file()
    assert (out / "eval" / "eval-Breakout" / "action_fidelity.csv").is_file()
    # The imagine stage: heads beside the world model, an agent trained in it, scored in the real game
    model_path = Path(json.loads((out / "stages" / "dit.json").read_text())["model_path"])
    assert (model_path / "heads").is_dir()
    imag = pd.read_csv(out / "imagine" / "imagine-Breakout" / "imagination.csv")
    assert list(imag.agent) == ["imagination", "random", "ppo_real"] and (imag.episodes == 30).all()
    assert (imag.return_ci_low <= imag.return_mean).all() and (imag.return_mean <= imag.return_ci_high).all()
    curve = pd.read_csv(out / "imagine" / "imagine-Breakout" / "learning_curve.csv")
    assert curve.steps.iloc[-1] >= 64 and (curve.generation_share > 0).all()
    assert curve.imagined_return_mean.notna().iloc[-1]  # imagined episodes ended (horizon 8) and were counted
    assert (out / "agents" / "imagine-Breakout" / "learner_group").is_dir()
    heads = pd.read_csv(records[0] / "heads.csv")  # the heads' test scores travel with the seed's record
    assert {"reward", "life_lost", "game_over"} <= set(heads.event), heads
    assert {"precision", "recall"} <= set(heads.columns), heads
    sweep_md = (out / "sweeps" / "sweep-ablations" / "ablations.md").read_text()
    assert all(v in sweep_md for v in ("past_future", "copy_last", "±")), sweep_md

    # MLflow, over HTTP: the experiment, the stage runs, the sweep's parent and child runs.
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name",
               experiment_name="atari-world-model")["experiment"]
    runs = _post(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    for name in ("vae", "dit-Breakout", "eval-Breakout", "imagine-Breakout", "sweep-ablations"):
        assert name in by_name, f"no MLflow run {name!r}; runs: {sorted(by_name)}"
    dit = by_name["dit-Breakout"]
    params = {p["key"]: p["value"] for p in dit["data"].get("params", [])}
    assert params["dit_preset"] == "tiny" and params["horizon_choices"] == "[1, 2, 4]"
    metrics = {m["key"] for m in dit["data"].get("metrics", [])}
    assert "train/loss" in metrics
    history = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history",
                   run_id=dit["info"]["run_id"], metric_key="train/loss")["metrics"]
    assert len(history) >= 3  # logged while training, not one final value
    assert any(p.startswith("world_model/") for p in _artifact_paths(mlflow_server, dit["info"]["run_id"]))

    ev = _artifact_paths(mlflow_server, by_name["eval-Breakout"]["info"]["run_id"])
    assert {"tables/generation_length.json", "tables/per_frame.json"} <= ev
    assert any(p.endswith(".gif") for p in ev) and any(p.endswith("actions.png") for p in ev)

    parent = by_name["sweep-ablations"]
    parent_id = parent["info"]["run_id"]
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" and t["value"] == parent_id
                                       for t in r["data"].get("tags", []))]
    assert len(children) == 2  # the reference and past + future actions (Table 3), one seed
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    # The reference variant is the job's own DiT, scored alike: not trained again, its scores the job's.
    job_record = records[0].name
    reused = [r for r in children if {"key": "reused_from", "value": job_record} in r["data"].get("tags", [])]
    assert len(reused) == 1 and "future-embedding" in reused[0]["info"]["run_name"], [
        (r["info"]["run_name"], r["data"].get("tags")) for r in children]
    reused_metrics = {m["key"]: m["value"] for m in reused[0]["data"]["metrics"]}
    assert "train/loss" not in reused_metrics
    job_t1 = pd.read_csv(out / "eval" / "eval-Breakout" / "generation_length.csv").query(
        "method == 'model' and generation_length == 1").mse.item()
    assert reused_metrics["T1/model/mse"] == pytest.approx(job_t1)
    trained = [r for r in children if r is not reused[0]]
    assert not list((out / "train").glob("*-future-embedding-*")), "the reference trial trained again"
    for child in trained:
        child_metrics = {m["key"] for m in child["data"]["metrics"]}
        assert "train/loss" in child_metrics and any(k.startswith("eval/") for k in child_metrics)
    assert {"tables/ablations.json", "tables/trials.json"} <= _artifact_paths(mlflow_server, parent_id)
    parent_metrics = {m["key"] for m in parent["data"].get("metrics", [])}
    assert any(k.startswith("sweep/action_mode:past_future/") and k.endswith("/horizon:4/mse")
               for k in parent_metrics), sorted(parent_metrics)
    assert not (out / "mlflow_pending.jsonl").exists(), "MLflow calls failed during the job"
    _check_results_tables(out, out.parent / "tables")


def _check_results_tables(out: Path, tables: Path) -> None:
    """`python -m pipeline.results tables` reads the job's record back: its Table 2 rows of the model
    carry the evaluation's MSE at each generation length, from one seed (so not reported)."""
    import pandas as pd

    res = subprocess.run([sys.executable, "-m", "pipeline.results", "tables", "--runs", str(out / "results"),
                          "--out", str(tables), "--preset", "smoke", "--n-boot", "200"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    t2 = pd.read_csv(tables / "table2.csv")
    model = t2[(t2.game == "Breakout") & (t2.method == "model")].set_index("T")
    vs = pd.read_csv(out / "eval" / "eval-Breakout" / "vs_paper.csv").set_index("generation_length")
    assert len(model) and set(model.index) <= set(vs.index)
    for T, row in model.iterrows():
        assert row.mse == pytest.approx(vs.loc[T, "mse"], rel=1e-4), T
        assert row.seeds == 1 and not row.reported

    # Tables 3 and 4 from the sweep's trial records: the reference row is the job's own evaluation.
    res = subprocess.run([sys.executable, "-m", "pipeline.results", "ablations", "--runs", str(out / "results"),
                          "--out", str(tables), "--preset", "smoke", "--n-boot", "200"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    t = pd.read_csv(tables / "table3.csv")
    rows = t[(t.method == "model") & (t["T"] == 1)].set_index("variant")
    assert set(rows.index) == {"future", "past_future"}, t
    assert rows.loc["future", "mse"] == pytest.approx(vs.loc[1, "mse"], rel=1e-4) and rows.loc["future", "seeds"] == 1
    assert pd.notna(rows.loc["past_future", "diff_vs_reference"])
    assert rows.loc["past_future", "mse"] != rows.loc["future", "mse"]
    t4 = pd.read_csv(tables / "table4.csv")  # no trial varied the encoder: the reference's rows alone
    t4_model = t4[t4.method == "model"]
    assert set(t4_model.variant) == {"embedding"} and t4_model.diff_vs_reference.isna().all(), t4


@pytest.fixture(scope="module", autouse=True)
def _cluster_stopped_after_this_module(job_cluster):
    """No later test uses the head or the server: stop them rather than leave them polling."""
    yield
    job_cluster.stop()


@pytest.mark.timeout(3000)
def test_smoke_job_submitted_to_a_ray_cluster_logs_to_mlflow_server(job_cluster):
    address, env, head_dir = job_cluster.head()
    mlflow_server = job_cluster.mlflow()
    res, out = job_cluster.submit_smoke_job().result(timeout=2900)
    assert res.returncode == 0, (f"job failed:\n{(res.stdout + res.stderr)[-6000:]}\n"
                                 f"head's dashboard agent:\n{head_agent_log(head_dir)}")
    assert "succeeded" in res.stdout, res.stdout[-3000:]

    _check_outputs(out, mlflow_server)

    # A second submission reuses every completed stage and adds no duplicate rows.
    rows_before = sorted(p.name for p in (out / "data" / "episodes").rglob("*.parquet"))
    res2 = submit_job(address, env, REPO, ["python", "pipeline/run_all.py", "--preset", "smoke", "--out", str(out),
                                           "--tracking-uri", mlflow_server], out.parent / "job2.log")
    assert res2.returncode == 0, (res2.stdout + res2.stderr)[-4000:]
    for stage in ("collect", "vae", "dit", "evaluate", "collect-other-policy", "evaluate-other-policy", "sweep"):
        assert f"{stage}: reusing the completed stage" in res2.stdout
    assert sorted(p.name for p in (out / "data" / "episodes").rglob("*.parquet")) == rows_before


@pytest.mark.timeout(900)
def test_a_submitted_script_imports_the_uploaded_copy(tmp_path, job_cluster):
    """`ray job submit --working-dir <dir> -- python pipeline/run_all.py` (or `python -m
    pipeline.run_all`) runs the copy of <dir> that the cluster received: every package it imports
    comes from there, not from <dir> itself nor from the checkout installed in this environment."""
    from test_cli import PACKAGES, copy_reporting_origin, origins

    address, env, head_dir = job_cluster.head()
    app = copy_reporting_origin(tmp_path / "app")
    # the documented form (a script by path) and the module form
    for i, command in enumerate((["python", "pipeline/run_all.py", "--help"],
                                 ["python", "-m", "pipeline.run_all", "--help"])):
        res = submit_job(address, env, app, command, tmp_path / f"job{i}.log")
        assert res.returncode == 0, (command, (res.stdout + res.stderr)[-4000:])
        found = origins(res.stdout)
        assert set(found) == set(PACKAGES), (command, res.stdout[-4000:])
        # the head's temp folder (linked as <its folder>/ray*), whose session unpacks the uploads
        heads = [link.resolve() for link in head_dir.glob("ray*") if link.is_symlink()]
        assert all(any(path.is_relative_to(h) for h in heads) for path in found.values()), (command, found, heads)
