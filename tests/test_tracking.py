"""The MLflow module against real local stores (sqlite), no Ray needed."""

import json
import socket
from dataclasses import dataclass

import matplotlib
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.tracking import PENDING_FILE, Tracker, flatten_params, load_table, local_tracking_uri  # noqa: E402


@dataclass(frozen=True)
class _Cfg:
    lr: float = 1e-3
    horizons: tuple[int, ...] = (1, 2, 4)
    name: str = "x"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_params_nested_and_sequences():
    flat = flatten_params({"a": {"b": 1, "c": (1, 2)}, "d": "x"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
    assert flatten_params(_Cfg())["horizons"] == "[1, 2, 4]"


def test_roundtrip_params_metrics_table_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with Tracker(tmp_path, "run-a") as tr:
        tr.log_params(_Cfg())
        tr.log_metric_rows([{"step": 1, "train/loss": 2.0, "time": 1.0},
                            {"step": 2, "train/loss": 1.0, "time": 2.0, "event": "x"}])
        tr.log_metrics({"eval/psnr@1": 30.5}, step=0)
        table = pd.DataFrame({"game": ["Breakout"], "mse": [1.5]})
        tr.log_table(table, "tables/table2.json")
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        tr.log_figure(fig, "figures/plot.png")
        tr.log_artifact(tmp_path / "model", "world_model")
        run_id = tr.run_id
    assert tr.tracking_uri == local_tracking_uri(tmp_path)
    assert (tmp_path / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=local_tracking_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["horizons"] == "[1, 2, 4]"
    hist = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 2.0), (2, 1.0)]
    back = load_table(local_tracking_uri(tmp_path), run_id, "tables/table2.json")
    assert back["mse"].tolist() == [1.5]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"figures", "world_model", "tables"} <= names
    assert (tmp_path / "mlartifacts").exists()  # artifacts stay in the run directory


def test_same_name_continues_run_and_rejects_changed_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker(tmp_path, "run-b") as tr:
        tr.log_params(_Cfg())
        first = tr.run_id
    with Tracker(tmp_path, "run-b") as tr:
        assert tr.run_id == first
        tr.log_params(_Cfg())  # same values: fine
        with pytest.raises(ValueError, match="lr"):
            tr.log_params(_Cfg(lr=0.5))


def test_unreachable_server_falls_back_to_local_store(tmp_path, capsys):
    dead = f"http://127.0.0.1:{_free_port()}"
    with Tracker(tmp_path, "run-c", tracking_uri=dead) as tr:
        tr.log_metrics({"train/loss": 1.0}, step=3)
    assert "unreachable" in capsys.readouterr().out
    assert tr.fallback_from == dead and tr.tracking_uri == local_tracking_uri(tmp_path)
    run = MlflowClient(tracking_uri=local_tracking_uri(tmp_path)).get_run(tr.run_id)
    assert run.data.tags["tracking/fallback_from"] == dead
    assert run.data.metrics["train/loss"] == 1.0


def test_failed_calls_are_kept_and_replayed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = Tracker(tmp_path, "run-d")
    real = tr.client.log_batch

    def down(*a, **k):
        raise ConnectionError("store down")

    monkeypatch.setattr(tr.client, "log_batch", down)
    tr.log_metrics({"train/loss": 4.0}, step=7)
    pending = [json.loads(x) for x in (tmp_path / PENDING_FILE).read_text().splitlines()]
    assert pending[0]["metrics"] == {"train/loss": 4.0} and pending[0]["step"] == 7
    monkeypatch.setattr(tr.client, "log_batch", real)
    assert tr.replay_pending() == 1
    assert not (tmp_path / PENDING_FILE).exists()
    hist = tr.client.get_metric_history(tr.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(7, 4.0)]
    tr.end()
