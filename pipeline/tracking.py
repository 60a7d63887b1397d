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
- The world model is also an MLflow model (`Tracker.log_world_model`): an `mlflow.pyfunc` model
  (`WorldModelPyfunc`, input format in its docstring) logged through the same explicit client, so
  `models:/<model id>` and `runs:/<run id>/world_model_pyfunc` load it (`mlflow.pyfunc.load_model`,
  or `resolve_world_model_uri` for the plain world-model directory inside it). A run's training
  data is its input (`Tracker.log_dataset`): an `mlflow.data` dataset that describes the Parquet
  episodes (source, schema, digest, profile) without copying them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterable

import mlflow
import mlflow.data.meta_dataset
import mlflow.pyfunc
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# A dead server must fail fast, not after mlflow's default of minutes of retries (mlflow reads
# both at each request, so setting them after its import counts).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "atari-world-model"
PENDING_FILE = "mlflow_pending.jsonl"
PYFUNC_NAME = "world_model_pyfunc"
"""Name of the world model's LoggedModel in its training run: `runs:/<run id>/world_model_pyfunc`."""


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
        # local copies of this MLflow run's tables and figures (what a replay uploads)
        self.artifact_dir = self.run_dir / "tracking" / run_name
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
            elif op == "dataset":
                self.log_dataset(**rec["dataset"])
            elif op == "world_model":
                self.log_world_model(rec["path"], name=rec["name"], step=rec.get("step", 0))
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
        local = self.artifact_dir / artifact_file
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
        local = self.artifact_dir / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(local, dpi=100, bbox_inches="tight")
        parent = str(Path(artifact_file).parent)
        self.log_artifact(local, None if parent == "." else parent)

    def log_dataset(self, source: str, name: str, digest: str, schema: dict[str, str],
                    profile: dict[str, Any] | None = None, context: str = "training") -> None:
        """A dataset the run read, as the run's input (what `mlflow.log_input` records, through this
        run's client): `source` the data's location (a path or URI), `schema` column -> Arrow type
        name (`str(pa.DataType)`), `profile` summary numbers (rows, episodes, ...)."""
        record = {"dataset": {"source": source, "name": name, "digest": digest, "schema": schema,
                              "profile": profile, "context": context}}

        def log() -> None:
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            ds = ParquetDataset(source, name=name, digest=digest, schema=schema, profile=profile)
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(
                ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

        self._safe("dataset", record, log)

    def log_world_model(self, path: str | Path, name: str = PYFUNC_NAME, step: int = 0) -> str | None:
        """The world-model directory at `path` as an `mlflow.pyfunc` model of this run (a LoggedModel
        named `name`, an output of the run at `step`); returns its `models:/<model id>` URI, also set
        as the run's tag `world_model/pyfunc_uri`. None when the store failed (the call waits in the
        pending JSONL for `replay_pending`)."""
        path = Path(path)
        if not (path / "world_model.json").is_file():
            raise FileNotFoundError(f"{path} is not a world-model directory (no world_model.json)")
        uri: list[str] = []
        self._safe("world_model", {"path": str(path), "name": name, "step": int(step)},
                   lambda: uri.append(self._log_world_model(path, name, int(step))))
        return uri[0] if uri else None

    def _log_world_model(self, path: Path, name: str, step: int) -> str:
        import tempfile

        import mlflow.pyfunc
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        meta = json.loads((path / "world_model.json").read_text())
        tags = {"game": str(meta.get("game", "")), "action_mode": str(meta.get("action_mode", "")),
                "n_cond": str(meta.get("n_cond", "")), "horizon": str(meta.get("horizon", ""))}
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                tags=tags, model_type="world_model")
        keys = ("game", "n_cond", "horizon", "trained_horizons", "action_mode", "sample_steps")
        try:
            info = Model(artifact_path=model.artifact_location, run_id=self.run_id, model_id=model.model_id,
                         model_uuid=model.model_id)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                # "Models from code": the model is this two-line file, not a pickled object.
                code = Path(tmp) / "world_model_pyfunc.py"
                code.write_text("from mlflow.models import set_model\n\n"
                                "from pipeline.tracking import WorldModelPyfunc\n\nset_model(WorldModelPyfunc())\n")
                with warnings.catch_warnings():  # no input example: the signature describes the input
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    mlflow.pyfunc.save_model(
                        str(local), python_model=str(code), artifacts={"world_model": str(path)},
                        signature=world_model_signature(meta), pip_requirements=_pip_requirements(),
                        mlflow_model=info, metadata={k: meta[k] for k in keys if k in meta})
                self.client.log_model_artifacts(model.model_id, str(local))
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=step)])
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        except BaseException:
            try:
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            except Exception:  # noqa: BLE001 - the store is down; the first error is the one to see
                pass
            raise
        uri = f"models:/{model.model_id}"
        self.set_tags({"world_model/pyfunc_uri": uri})
        return uri

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


# -- the world model as an MLflow model --------------------------------------------------------------
class WorldModelPyfunc(mlflow.pyfunc.PythonModel):
    """The world model (workers/world_model.py) as an `mlflow.pyfunc` model.

    `predict(model_input, params=None)`:

    - `model_input`: a dict of numpy arrays (the model's tensor signature),
      `cond_frames` uint8 (B, n_cond, 210, 160, 3): the n_cond condition frames of each sample,
      oldest first, raw RGB screens as the dataset's `frame` column holds them;
      `actions` int64 (B, A): ids of the game's own action set (`workers.atari.action_meanings`,
      the dataset's `action` column), A = T for a model of action_mode "future" (a_t..a_{t+T-1},
      a_t taken at the last condition frame) or n_cond - 1 + T for "past_future" (the actions
      that led between the condition frames first). A pandas DataFrame with those two columns,
      one sample a row and an array a cell, is accepted too.
    - `params` (optional): `horizon` T (0 = what the actions give), `seed` of the sampler's noise
      (default 0: the same input gives the same frames), `sample_steps` (0 = the model's own).
    - Returns uint8 (B, T, 210, 160, 3): the generated frames. The model's metadata (MLmodel)
      holds n_cond, horizon, trained_horizons and action_mode.

    Logged as "models from code" (a file that builds this class), so loading needs this
    repository's packages (`pip install -e .`).
    """

    # The input is checked against the explicit tensor signature (`world_model_signature`), not by
    # MLflow's type-hint validation (which would wrap `predict` and warn that it has no hints).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from workers.world_model import load_world_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.world_model = load_world_model(context.artifacts["world_model"], device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import copy

        import numpy as np
        import torch

        from models.rectified_flow import EulerSampler, EulerSamplerConfig

        wm, params = self.world_model, params or {}
        if hasattr(model_input, "columns"):  # a DataFrame: one sample a row
            model_input = {c: np.stack([np.asarray(v) for v in model_input[c]]) for c in model_input.columns}
        if not isinstance(model_input, dict) or not {"cond_frames", "actions"} <= set(model_input):
            raise ValueError("model_input must hold `cond_frames` uint8 (B, n_cond, 210, 160, 3) and `actions` "
                             f"int64 (B, A); got {type(model_input).__name__}")
        cond = torch.from_numpy(np.ascontiguousarray(model_input["cond_frames"], dtype=np.uint8))
        actions = torch.from_numpy(np.asarray(model_input["actions"], dtype=np.int64))
        horizon = int(params.get("horizon") or 0) or actions.shape[-1] - wm.num_actions_for(0)
        steps = int(params.get("sample_steps") or 0)
        if steps:  # the same modules with a sampler of this call's own
            wm = copy.copy(wm)
            wm.sampler = EulerSampler(EulerSamplerConfig(num_steps=steps, guidance_scale=wm.sampler.cfg.guidance_scale))
        g = torch.Generator(device=wm.device).manual_seed(int(params.get("seed") or 0))
        return wm.predict(cond, actions, horizon, generator=g).numpy()


def world_model_signature(meta: dict[str, Any]):
    """The pyfunc's signature: tensors in and out (shapes from the world model's metadata), params."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    h, w, c = 210, 160, 3
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, int(meta["n_cond"]), h, w, c), "cond_frames"),
                     TensorSpec(np.dtype(np.int64), (-1, -1), "actions")])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, h, w, c), "frames")])
    params = ParamSchema([ParamSpec("horizon", "long", 0), ParamSpec("seed", "long", 0),
                          ParamSpec("sample_steps", "long", 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _pip_requirements() -> list[str]:
    """What loading the pyfunc imports, pinned to this environment (given, not inferred: MLflow's
    inference loads the model in a subprocess, which costs a training run seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "numpy", "einops", "pandas"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


_ARROW_TO_MLFLOW = {"string": "string", "large_string": "string", "int8": "integer", "int16": "integer",
                    "int32": "integer", "int64": "long", "float": "float", "float32": "float", "halffloat": "float",
                    "double": "double", "float64": "double", "bool": "boolean", "binary": "binary",
                    "large_binary": "binary", "timestamp": "datetime"}


class ParquetDataset(mlflow.data.meta_dataset.MetaDataset):
    """An `mlflow.data` dataset that describes Parquet data in place: its source (path or URI),
    column schema, digest and a profile (counts), never the rows."""

    def __init__(self, source: str, *, name: str, digest: str, schema: dict[str, str],
                 profile: dict[str, Any] | None = None):
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.types import ColSpec, DataType, Schema

        with warnings.catch_warnings():  # a local path resolves to the same source class twice
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(source)
        cols = [ColSpec(DataType[_ARROW_TO_MLFLOW.get(t.split("[")[0].split("(")[0], "binary")], c)
                for c, t in schema.items()]
        self._profile = profile
        super().__init__(src, name=name, digest=digest, schema=Schema(cols))

    @property
    def profile(self) -> dict[str, Any] | None:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        if self._profile is not None:
            out["profile"] = json.dumps(self._profile)
        return out


def resolve_world_model_uri(uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """`models:/<model id>`, `models:/<registered name>/<version>` (or `@<alias>`), `runs:/<run
    id>/<path>` (a LoggedModel of that run by name, e.g. world_model_pyfunc, or a run artifact such
    as the plain `world_model` directory), or any artifact URI -> a local world-model directory
    under `dst` (for `workers.world_model.load_world_model`). URIs are resolved through a client of
    `tracking_uri` (MLflow's own resolution reads the process-global store instead)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    location = uri
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        if "/" not in ref and "@" not in ref:  # a LoggedModel id
            location = client.get_logged_model(ref).artifact_location
        elif "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
            location = client.get_model_version_download_uri(name, mv.version)
        else:
            name, version = ref.split("/", 1)
            location = client.get_model_version_download_uri(name, version)
        if location.startswith("models:/"):  # a registered version of a LoggedModel
            return resolve_world_model_uri(location, dst, tracking_uri)
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        run = client.get_run(run_id)
        found = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
        location = found[0].artifact_location if found else f"{run.info.artifact_uri.rstrip('/')}/{path}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    # a world-model directory itself, or the pyfunc model whose `world_model` artifact holds one
    # (MLflow keeps an artifact under its source directory's name: artifacts/<name>/)
    for cand in [local, local / "world_model", *sorted(local.glob("artifacts/*"))]:
        if (cand / "world_model.json").is_file():
            return cand
    raise FileNotFoundError(f"{uri} holds no world model (no world_model.json in {local}, nor in its artifacts/*)")
