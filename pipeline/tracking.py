"""The one module that talks to MLflow.

Every other module hands plain Python values (dicts, DataFrames, file paths, matplotlib figures) to
a `Tracker`; only this file imports mlflow. Decisions:

- Default store: an embedded sqlite file in the run directory (`sqlite:///<run_dir>/mlflow.db`,
  artifacts under `<run_dir>/mlartifacts`), so nothing needs starting. A server is used when
  `MLFLOW_TRACKING_URI` or the `tracking_uri` argument names one.
- An unreachable server never stops training. At start-up the server is probed (one short HTTP
  request); if it does not answer, the run goes to the local sqlite store instead, a warning says
  so and the run carries the tag `tracking/fallback_from`. If the server dies mid-run, each failed
  call is appended to `<run_dir>/mlflow_pending.jsonl` (artifacts stay on local disk and are named
  by path) and `replay_pending()` uploads them later; nothing is lost either way.
- A run is identified by (experiment, run name): opening the same name again continues the same
  MLflow run, matching how a Ray Train run with the same name resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

# A dead server must fail fast, not after mlflow's default of minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "atari-world-model"
PENDING_FILE = "mlflow_pending.jsonl"


def local_tracking_uri(run_dir: str | Path) -> str:
    """The embedded sqlite store of a run directory."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(run_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Flag, then MLFLOW_TRACKING_URI, then the run directory's sqlite file."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(run_dir)


def server_reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """True for non-HTTP stores; for a server, whether its /health answers within timeout_s."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) dataclass or dict -> {"a.b": "value"}; tuples/lists become JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = str(value)
    return out


class Tracker:
    """One MLflow run. Use as a context manager, or call `end()`."""

    def __init__(
        self,
        run_dir: str | Path,
        run_name: str,
        *,
        experiment: str = DEFAULT_EXPERIMENT,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pending_path = self.run_dir / PENDING_FILE
        wanted = resolve_tracking_uri(self.run_dir, tracking_uri)
        self.fallback_from: str | None = None
        if not server_reachable(wanted):
            self.fallback_from = wanted
            wanted = local_tracking_uri(self.run_dir)
            msg = (f"MLflow tracking server {self.fallback_from} is unreachable; training carries on "
                   f"and this run is logged to the local store {wanted} instead")
            log.warning(msg)
            print(f"[tracking] WARNING: {msg}", flush=True)
        self.tracking_uri = wanted
        self.client = MlflowClient(tracking_uri=wanted)
        self.experiment_id = self._experiment_id(experiment)
        self.run_id = self._find_or_create_run(run_name, tags or {})
        if self.fallback_from:
            self.set_tags({"tracking/fallback_from": self.fallback_from})

    # -- setup ---------------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # With a sqlite store, mlflow's default artifact root is ./mlruns relative to the current
        # directory; pin it inside the run directory instead. A server chooses its own.
        location = None
        if self.tracking_uri.startswith("sqlite:"):
            location = (self.run_dir / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _find_or_create_run(self, run_name: str, tags: dict[str, str]) -> str:
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
            max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "resumed", "true")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    # -- fault tolerance -----------------------------------------------------------------------
    def _safe(self, op: str, record: dict[str, Any], fn, *args, **kwargs) -> None:
        """Run one logging call; on a store failure keep the call in the pending JSONL."""
        try:
            fn(*args, **kwargs)
        except Exception as err:  # mlflow raises MlflowException or requests errors when down
            msg = f"MLflow call {op} failed ({type(err).__name__}: {err}); kept in {self.pending_path}"
            log.warning(msg)
            print(f"[tracking] WARNING: {msg}", flush=True)
            with open(self.pending_path, "a") as fh:
                fh.write(json.dumps({"op": op, "time": time.time(), **record}) + "\n")

    def replay_pending(self) -> int:
        """Upload the calls kept while the store was down; returns how many were replayed."""
        if not self.pending_path.exists():
            return 0
        lines = [json.loads(line) for line in self.pending_path.read_text().splitlines() if line]
        self.pending_path.unlink()
        for rec in lines:
            op = rec["op"]
            if op == "metrics":
                self.log_metrics(rec["metrics"], step=rec["step"])
            elif op == "params":
                self.log_params(rec["params"])
            elif op == "tags":
                self.set_tags(rec["tags"])
            elif op == "artifact":
                self.log_artifact(rec["path"], rec.get("artifact_path"))
            elif op == "table":
                import pandas as pd
                self.log_table(pd.read_json(rec["path"], orient="split"), rec["artifact_file"])
        return len(lines)

    # -- logging -------------------------------------------------------------------------------
    def log_params(self, params: Any) -> None:
        """A config dataclass or dict, flattened to dotted keys."""
        flat = flatten_params(params)
        try:
            existing = self.client.get_run(self.run_id).data.params
        except Exception:  # store down: the pending JSONL keeps the params for a replay
            existing = {}
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
        if changed:
            raise ValueError(f"run {self.run_id} already holds different values for params "
                             f"{changed} (old, new); use a new run name for a new configuration")
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):  # mlflow's log_batch takes at most 100 params
            self._safe("params", {"params": {p.key: p.value for p in new[i:i + 100]}},
                       self.client.log_batch, self.run_id, params=new[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._safe("tags", {"tags": tags}, self.client.log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        self._safe("metrics", {"metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step)},
                   self.client.log_batch, self.run_id, metrics=items)

    def log_metric_rows(self, rows: Iterable[dict[str, Any]], keys_prefix: str = "") -> int:
        """Rows like {"step": 10, "train/loss": 0.3, ...} (the training JSONL); returns rows logged."""
        n = 0
        batch: list[Metric] = []
        for row in rows:
            ts = int(row.get("time", time.time()) * 1000)
            for k, v in row.items():
                if k in ("step", "time", "event") or not isinstance(v, (int, float)):
                    continue
                batch.append(Metric(keys_prefix + k, float(v), ts, int(row["step"])))
            n += 1
        for i in range(0, len(batch), 1000):  # log_batch's metric limit
            self._safe_metrics(batch[i:i + 1000])
        return n

    def _safe_metrics(self, chunk: list[Metric]) -> None:
        try:
            self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:
            log.warning("MLflow log_batch failed (%s); keeping metrics in %s", err, self.pending_path)
            print(f"[tracking] WARNING: metrics kept in {self.pending_path}: {err}", flush=True)
            with open(self.pending_path, "a") as fh:
                for m in chunk:
                    fh.write(json.dumps({"op": "metrics", "metrics": {m.key: m.value},
                                         "step": m.step}) + "\n")

    def log_table(self, df, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table (readable back with MlflowClient.load_table)."""
        if not artifact_file.endswith(".json"):
            raise ValueError(f"MLflow tables must be .json artifact files, got {artifact_file!r}")
        local = self.run_dir / "tables" / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        df.to_json(local, orient="split")  # a local copy, also what a replay uploads
        self._safe("table", {"path": str(local), "artifact_file": artifact_file},
                   self.client.log_table, self.run_id, data=df, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole directory."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._safe("artifact", {"path": str(path), "artifact_path": artifact_path},
                   fn, self.run_id, str(path), artifact_path)

    def log_figure(self, fig, artifact_file: str) -> None:
        """A matplotlib figure, saved locally first so that a replay can upload it."""
        local = self.run_dir / "figures" / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(local, dpi=100, bbox_inches="tight")
        parent = str(Path(artifact_file).parent)
        self.log_artifact(local, None if parent == "." else parent)

    def end(self, status: str = "FINISHED") -> None:
        self._safe("terminate", {"status": status},
                   self.client.set_terminated, self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


def artifact_uri(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.artifact_uri


def download_artifacts(tracking_uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """Fetch a logged artifact (e.g. the world-model directory) to a local folder."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    dst_path=str(dst), tracking_uri=tracking_uri))


def load_table(tracking_uri: str, run_id: str, artifact_file: str):
    """Read a table logged with `Tracker.log_table` back as a DataFrame.

    Reads the artifact through an explicit client. (MlflowClient.load_table finds runs through the
    fluent, process-global tracking URI; pointing that global at one store made later clients of
    other stores in the same process write to the wrong one, so it is avoided.)
    """
    import tempfile

    import pandas as pd

    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, artifact_file, tmp)
        return pd.read_json(local, orient="split", dtype=False)
