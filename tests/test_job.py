"""The whole job as users start it: a real `ray start --head` cluster, `ray job submit
--working-dir .`, the smoke preset, logging over HTTP to a real MLflow server; everything is then
checked through MLflow's REST API and the files the job wrote.

Takes several minutes on 2 cores (it runs every stage, including a small Tune sweep)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int, low: int = 25000, high: int = 32000) -> list[int]:
    """`n` distinct ports that bind now, drawn below Linux's ephemeral range (32768-60999).

    A port taken from the ephemeral range can be handed to some other process's outgoing
    connection between being picked and being bound, which is more likely on a machine where
    another Ray cluster (the suite's own) keeps opening connections. Ports below it are only
    ever taken by an explicit bind."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


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


def _wait_until_answering(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Poll `url` until it answers (any HTTP status, e.g. 401 without a token, counts); fail with
    the tail of `log` if `proc` exits first, or after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log.read_text()[-3000:]}")
            time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


@pytest.fixture()
def mlflow_server(tmp_path):
    port, = _free_ports(1)
    store = tmp_path / "mlflow"
    store.mkdir()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    _wait_until_answering(f"{base}/health", proc, tmp_path / "mlflow.log", "mlflow server", 120)
    yield base
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"(no {path.name})"


def _head_alive(gcs: int, env: dict) -> bool:
    """Whether the head's raylet has registered with its GCS (`ray status` lists an active node)."""
    res = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs}"],
                         env=env, capture_output=True, text=True, timeout=60)
    return res.returncode == 0 and "node_" in res.stdout.split("Pending:")[0]


def _start_head(tmp_path: Path, env: dict, attempt: int) -> tuple[subprocess.Popen, str, Path]:
    """Start one head; return it once its dashboard answers and its raylet is registered, or
    raise with the tails of its logs."""
    dash, gcs, agent_http, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = _free_ports(8)
    # its own block of worker ports, apart from those and from Ray's default 10002-19999
    workers = random.randrange(20000, 24000)
    # Its own short temp dir (Unix socket paths must stay under 108 bytes), so its logs are findable.
    temp_dir = Path(tempfile.mkdtemp(prefix="awm-ray-", dir="/tmp"))
    link = tmp_path / ("ray" if attempt == 0 else f"ray.{attempt}")
    link.symlink_to(temp_dir)
    log_path = tmp_path / f"ray_head.{attempt}.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
         f"--min-worker-port={workers}", f"--max-worker-port={workers + 999}",
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # the job API answers once the dashboard is up; the raylet registers a little later
        _wait_until_answering(f"{address}/api/version", proc, log_path, "the Ray head's dashboard", 180)
        deadline = time.time() + 120
        while not _head_alive(gcs, env):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the Ray head's raylet did not register with its GCS")
            time.sleep(2)
    except Exception as e:
        _stop_head(proc, None)
        logs = sorted(temp_dir.glob("session_*/logs"))
        raylet = (_tail(logs[-1] / "raylet.out") + "\n" + _tail(logs[-1] / "raylet.err")) if logs else ""
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"{e}\nray start:\n{_tail(log_path)}\nraylet:\n{raylet}") from e
    return proc, address, temp_dir


def _stop_head(proc: subprocess.Popen, temp_dir: Path | None) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node started like a user would, with token auth (Ray 2.60's default), shared by
    this module's jobs: `(dashboard address, env, folder of its logs)`.

    `--block` keeps `ray start` in the foreground as the parent of the head's processes, so
    stopping its process group ends this cluster only (`ray stop` would end every Ray cluster on
    the machine, the test session's own included).

    Every port the head listens on is chosen free, and its workers get a port block of their own:
    the test session's own cluster (`ray_local`) already holds Ray's fixed defaults, e.g. the dashboard
    agent's 52365, and a head whose agent cannot bind answers every submission with "No available
    agent to submit job". A head whose raylet dies while starting (CI saw one crash in its
    NodeManager's constructor once) is started again, at most three times, on fresh ports; the
    failures' logs are kept in its folder."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    # No drain on SIGTERM: `ray start --block` would otherwise ask the GCS, which the same signal to
    # the process group is stopping, to drain the node, and wait out its 30 s timeout at teardown.
    # The job's `python` is the test's own (its venv first on PATH), also when pytest runs as
    # `.venv/bin/python -m pytest` from a shell that did not activate the venv.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    errors = []
    for attempt in range(3):
        try:
            proc, address, temp_dir = _start_head(tmp_path, env, attempt)
            break
        except RuntimeError as e:
            errors.append(str(e))
            (tmp_path / f"ray_head.{attempt}.error").write_text(str(e))
    else:
        raise RuntimeError("the Ray head did not start in 3 attempts:\n" + "\n---\n".join(errors))
    yield address, env, tmp_path
    _stop_head(proc, temp_dir)


def _submit(address: str, env: dict, out: Path, tracking: str, log: Path) -> subprocess.CompletedProcess:
    return _submit_job(address, env, REPO, ["python", "pipeline/run_all.py", "--preset", "smoke", "--out", str(out),
                                            "--tracking-uri", tracking], log)


def _submit_job(address: str, env: dict, working_dir: Path, entrypoint: list[str], log: Path
                ) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(working_dir), "--",
           *entrypoint]
    deadline = time.time() + 180  # the head's job agent can come up a while after its dashboard
    while True:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400)
        if "No available agent to submit job" not in res.stdout + res.stderr or time.time() > deadline:
            break
        time.sleep(5)
    log.write_text(res.stdout + res.stderr)
    return res


def _head_agent_log(tmp_path: Path) -> str:
    """The tail of the head's dashboard agent log, which says why the job agent is missing."""
    logs = sorted((tmp_path / "ray").glob("session_*/logs/dashboard_agent.log"))
    return logs[-1].read_text()[-3000:] if logs else "(no dashboard_agent.log)"


def _check_outputs(out: Path, mlflow_server: str) -> None:
    """What one smoke job must leave: files under --out, runs, metrics, tables and artifacts in MLflow."""
    # Files: every stage completed, under the absolute --out (not the job's temporary copy).
    for stage in ("collect", "vae", "dit", "evaluate", "imagine", "sweep"):
        assert (out / "stages" / f"{stage}.json").is_file(), f"stage {stage} left no marker"
    assert list((out / "data" / "episodes").glob("game=Breakout/run=smoke/*.parquet"))
    eval_csv = (out / "eval" / "eval-Breakout" / "generation_length.csv").read_text().splitlines()
    # model, copy-last and the VAE's reconstruction, at generation lengths 1, 2 and 4
    assert eval_csv[0].startswith("game,method,generation_length") and len(eval_csv) == 1 + 3 * 3
    assert {line.split(",")[1] for line in eval_csv[1:]} == {"model", "copy_last", "vae_recon"}
    # The evaluation's record (pipeline/results.py) pools into the results tables, with the action tests
    from pipeline.results import build_tables, load_run

    records = list((out / "results").glob("smoke-*-Breakout-s0-*"))
    assert len(records) == 1, records
    meta, scores = load_run(records[0])
    assert (meta["preset"], meta["split"], meta["seed"]) == ("smoke", "test", 0) and meta["stage_wall_s"]["dit"] > 0
    assert {"action_recorded/mse", "action_permuted/mse", "action_noop/differs", "episode_id"} <= set(scores)
    table2 = build_tables(out / "results", out / "current", "smoke", n_boot=200)
    assert set(table2.method) >= {"model", "copy_last"} and (table2.seeds.dropna() == 1).all()
    assert (out / "current" / "action_fidelity.csv").is_file()
    assert (out / "eval" / "eval-Breakout" / "action_fidelity.csv").is_file()
    # The imagine stage: heads beside the world model, an agent trained in it, scored in the real game
    import pandas as pd

    model_path = Path(json.loads((out / "stages" / "dit.json").read_text())["model_path"])
    assert (model_path / "heads").is_dir()
    imag = pd.read_csv(out / "imagine" / "imagine-Breakout" / "imagination.csv")
    assert list(imag.agent) == ["imagination", "random", "ppo_real"] and (imag.episodes == 30).all()
    assert (imag.return_ci_low <= imag.return_mean).all() and (imag.return_mean <= imag.return_ci_high).all()
    curve = pd.read_csv(out / "imagine" / "imagine-Breakout" / "learning_curve.csv")
    assert curve.steps.iloc[-1] >= 64 and (curve.generation_share > 0).all()
    assert curve.imagined_return_mean.notna().iloc[-1]  # imagined episodes ended (horizon 8) and were counted
    assert (out / "agents" / "imagine-Breakout" / "learner_group").is_dir()
    table3 = (out / "sweeps" / "sweep-table3" / "table3.md").read_text()
    assert "past_future" in table3 and "copy_last" in table3 and "±" in table3

    # MLflow, over HTTP: the experiment, the stage runs, the sweep's parent and child runs.
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name",
               experiment_name="atari-world-model")["experiment"]
    runs = _post(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    for name in ("vae", "dit-Breakout", "eval-Breakout", "imagine-Breakout", "sweep-table3"):
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

    parent = by_name["sweep-table3"]
    parent_id = parent["info"]["run_id"]
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" and t["value"] == parent_id
                                       for t in r["data"].get("tags", []))]
    assert len(children) == 2  # action_mode {future, past_future} at horizon 2, one seed
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    child_metrics = {m["key"] for m in children[0]["data"]["metrics"]}
    assert "train/loss" in child_metrics and any(k.startswith("eval/") for k in child_metrics)
    assert {"tables/table3.json", "tables/trials.json"} <= _artifact_paths(mlflow_server, parent_id)
    parent_metrics = {m["key"] for m in parent["data"].get("metrics", [])}
    assert "sweep/action_mode:past_future/horizon:2/mse" in parent_metrics
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


@pytest.mark.timeout(3000)
def test_smoke_job_submitted_to_a_ray_cluster_logs_to_mlflow_server(tmp_path, mlflow_server, ray_head):
    address, env, head_dir = ray_head
    out = tmp_path / "run"
    res = _submit(address, env, out, mlflow_server, tmp_path / "job1.log")
    assert res.returncode == 0, (f"job failed:\n{(res.stdout + res.stderr)[-6000:]}\n"
                                 f"head's dashboard agent:\n{_head_agent_log(head_dir)}")
    assert "succeeded" in res.stdout, res.stdout[-3000:]

    _check_outputs(out, mlflow_server)

    # A second submission reuses every completed stage and adds no duplicate rows.
    rows_before = sorted(p.name for p in (out / "data" / "episodes").rglob("*.parquet"))
    res2 = _submit(address, env, out, mlflow_server, tmp_path / "job2.log")
    assert res2.returncode == 0, (res2.stdout + res2.stderr)[-4000:]
    for stage in ("collect", "vae", "dit", "evaluate", "sweep"):
        assert f"{stage}: reusing the completed stage" in res2.stdout
    assert sorted(p.name for p in (out / "data" / "episodes").rglob("*.parquet")) == rows_before


@pytest.mark.timeout(900)
def test_a_submitted_script_imports_the_uploaded_copy(tmp_path, ray_head):
    """`ray job submit --working-dir <dir> -- python pipeline/run_all.py` runs the copy of <dir> that
    the cluster received: every package it imports comes from there, not from <dir> itself nor
    from the checkout installed in this environment."""
    from test_cli import PACKAGES, copy_reporting_origin, origins

    address, env, head_dir = ray_head
    app = copy_reporting_origin(tmp_path / "app")
    res = _submit_job(address, env, app, ["python", "pipeline/run_all.py", "--help"], tmp_path / "job.log")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    found = origins(res.stdout)
    assert set(found) == set(PACKAGES), res.stdout[-4000:]
    # the head's temp folder (linked as <its folder>/ray*), whose session unpacks the uploads
    heads = [link.resolve() for link in head_dir.glob("ray*") if link.is_symlink()]
    assert all(any(path.is_relative_to(h) for h in heads) for path in found.values()), (found, heads)
