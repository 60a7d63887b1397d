"""Stage: Ray Tune sweeps over the paper's ablations, aggregated into Tables 2-4.

    python pipeline/sweep.py --run_dir /abs/runs/x --data_root /abs/data \
        --vae_path /abs/runs/x/models/vae --space table3 --seeds 0,1,2

Each trial is a function (Train V2 style: Tune runs a function that builds and fits the
TorchTrainer; `Tuner(TorchTrainer(...))` is rejected) that trains one DiT with the trial's
settings on the frozen VAE, scores it on the held-out windows, and reports the scores with
`ray.tune.report`. The ablation grids are data in `tune_spaces/`.

MLflow: the sweep is a parent run; each trial is a child run (tag `mlflow.parentRunId`) holding its
settings, its training curve and its scores. Trials open their child run by name before training,
and training and evaluation continue that same run (runs are found by name, see
`pipeline/tracking.py`). After all trials, the parent run gets the aggregated tables (mean ± std
over seeds, with the copy-last row) as MLflow tables, and `<run_dir>/sweeps/<name>/` gets them as
CSV and Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.tracking import Tracker  # noqa: E402
from pipeline.train import _ensure_ray, parse_config  # noqa: E402
from tune_spaces.spaces import PARAMS, SPACES, space_for  # noqa: E402
from workers.train_common import config_from_dict  # noqa: E402
from workers.train_dit import TrainDiTConfig  # noqa: E402

# The rows of each paper table: the ablated setting(s) beside the generation length.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "table2": ("game", "horizon"),
    "table3": ("action_mode", "horizon"),
    "table4": ("action_encoder", "horizon"),
    "model_size": ("dit_preset", "horizon"),
    "sampling_steps": ("sample_steps", "horizon"),
}
METRICS = ("mse", "psnr", "lpips")


@dataclass(frozen=True)
class SweepConfig:
    """One ablation sweep."""

    run_dir: str = "runs/default"
    """Pipeline run directory (absolute under `ray job submit`)."""
    data_root: str = ""
    """Root of the collected episodes."""
    vae_path: str = ""
    """Trained VAE directory (frozen in every trial)."""
    space: str = "table2"
    """Ablation grid, a key of tune_spaces.SPACES."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every grid point (mean ± std over them)."""
    overrides: str = ""
    """JSON object of grid overrides, e.g. '{"game": ["Breakout"], "dit_preset": "S"}' (a list sweeps)."""
    dit: str = ""
    """JSON object of TrainDiTConfig fields shared by all trials (steps, batch_size, ...)."""
    name: str = ""
    """Sweep name (Tune experiment and MLflow parent run); empty = `sweep-<space>`."""
    eval_max_windows: int = 64
    """Held-out windows scored per trial."""
    eval_stride: int = 16
    """Stride of the evaluation windows."""
    eval_lpips: bool = True
    """Score LPIPS in the trials."""
    eval_split: str = "val"
    """Split the trials are scored on: `val` while choosing, `test` for a reported table."""
    eval_idm_steps: int = 2000
    """Training steps of the inverse-dynamics model that reads every trial's rollouts (trained once
    per collection and game, shared by the trials; 0 = none)."""
    eval_idm_max_pairs: int = 8192
    """Real training pairs that inverse-dynamics model sees at most."""
    max_concurrent_trials: int = 1
    """Trials run at once (each holds its TorchTrainer's workers)."""
    use_gpu: bool = False
    """Train and evaluate every trial on a GPU."""

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"SweepConfig.space={self.space!r}; known spaces: {sorted(SPACES)}")
        from workers.schema import SPLITS

        if self.eval_split not in SPLITS:
            raise ValueError(f"SweepConfig.eval_split={self.eval_split!r} is no split; splits are {list(SPLITS)}")
        for field in ("overrides", "dit"):
            text = getattr(self, field)
            if text and not isinstance(json.loads(text), dict):
                raise ValueError(f"SweepConfig.{field} must be a JSON object, got {text!r}")

    @property
    def sweep_name(self) -> str:
        return self.name or f"sweep-{self.space}"


def trial_name(sweep: str, params: dict[str, Any]) -> str:
    return (f"{sweep}-{params['game']}-T{params['horizon']}-{params['action_mode']}-"
            f"{params['action_encoder']}-{params['dit_preset']}-k{params['sample_steps']}-s{params['seed']}")


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: train the DiT with `params`, evaluate it, report the scores."""
    from ray import tune

    from pipeline import evaluate
    from pipeline.train import train_dit_main

    uri, parent_id = sweep["_tracking_uri"], sweep["_parent_run_id"]
    cfg = SweepConfig(**{k: v for k, v in sweep.items() if not k.startswith("_")})
    params = {k: params[k] for k in PARAMS}
    name = trial_name(cfg.sweep_name, params)
    dit_cfg = config_from_dict(TrainDiTConfig, {
        **base, **{k: v for k, v in params.items()},
        "run_dir": cfg.run_dir, "data_root": cfg.data_root, "vae_path": cfg.vae_path, "name": name,
        "use_gpu": cfg.use_gpu, "horizon_choices": (),  # a trial trains one generation length, as the paper
    })
    # The child run exists, tagged with its parent, before training opens it again by name.
    with Tracker(cfg.run_dir, name, tracking_uri=uri, tags={"mlflow.parentRunId": parent_id,
                                          "sweep": cfg.sweep_name, "job": "trial"}) as tracker:
        tracker.log_params({f"trial.{k}": v for k, v in params.items()})
    model_path = train_dit_main(dit_cfg, tracking_uri=uri)
    tables = evaluate.main(evaluate.EvalConfig(
        run_dir=cfg.run_dir, model_path=str(model_path), data_root=cfg.data_root,
        games=(params["game"],), name=name, horizons=(params["horizon"],),
        stride=cfg.eval_stride, max_windows=cfg.eval_max_windows, lpips=cfg.eval_lpips, idm_steps=cfg.eval_idm_steps,
        idm_max_pairs=cfg.eval_idm_max_pairs, split=cfg.eval_split,
        figure_windows=1, action_sequences=(), num_cpus=0.5, use_gpu=cfg.use_gpu), tracking_uri=uri)
    df = tables["generation_length"]
    row = df[df["generation_length"] == params["horizon"]].set_index("method")
    metrics = {f"{method}/{m}": float(row.loc[method, m])
               for method in row.index for m in METRICS if m in row.columns}
    tune.report(metrics)


def aggregate(results: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Trial rows (params + `<method>/<metric>` scores) -> one row per (method, keys):
    mean and std over seeds, and the number of seeds."""
    score_cols = [c for c in results.columns if "/" in c and c.split("/")[1] in METRICS]
    long = results.melt(id_vars=list(keys) + ["seed"], value_vars=score_cols, var_name="score")
    long["method"] = long["score"].str.split("/").str[0]
    long["metric"] = long["score"].str.split("/").str[1]
    grouped = long.groupby(["method", *keys, "metric"])["value"]
    stats = grouped.agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)  # one seed: no spread
    wide = stats.pivot_table(index=["method", *keys], columns="metric", values=["mean", "std"])
    wide.columns = [m if s == "mean" else f"{m}_std" for s, m in wide.columns]
    wide = wide.reset_index()
    wide["seeds"] = stats.groupby(["method", *keys])["count"].max().values
    order = {"model": 0, "copy_last": 1}
    wide["_o"] = wide["method"].map(order).fillna(2)
    return wide.sort_values([*keys[:-1], keys[-1], "_o"]).drop(columns="_o").reset_index(drop=True)


def to_markdown(table: pd.DataFrame, keys: tuple[str, ...]) -> str:
    """Paper-style table: `mean ± std` cells, the copy-last baseline on its own rows."""
    cols = [*keys, "method"] + [m for m in METRICS if m in table.columns] + ["seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [r["method"]]
        for m in METRICS:
            if m in table.columns:
                digits = 4 if m == "lpips" else 2
                cells.append(f"{r[m]:.{digits}f} ± {r[m + '_std']:.{digits}f}")
        cells.append(str(int(r["seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: SweepConfig, tracking_uri: str | None = None) -> pd.DataFrame:
    """Run the sweep; returns the aggregated table (also written and logged)."""
    from ray import tune

    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().resolve()),
                              data_root=str(Path(cfg.data_root).expanduser().resolve()),
                              vae_path=str(Path(cfg.vae_path).expanduser().resolve()))
    if not Path(cfg.vae_path, "vae.pt").exists():
        raise FileNotFoundError(f"SweepConfig.vae_path={cfg.vae_path} holds no vae.pt: train the VAE first")
    base = json.loads(cfg.dit) if cfg.dit else {}
    config_from_dict(TrainDiTConfig, base)  # unknown keys fail here, before any trial starts
    space = space_for(cfg.space, seeds=cfg.seeds, overrides=json.loads(cfg.overrides) if cfg.overrides else None)
    _ensure_ray()
    out_dir = Path(cfg.run_dir) / "sweeps" / cfg.sweep_name
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = TABLE_KEYS[cfg.space]

    with Tracker(cfg.run_dir, cfg.sweep_name, tracking_uri=tracking_uri,
                 tags={"job": "sweep", "space": cfg.space}) as parent:
        parent.log_params(cfg)
        trainable = tune.with_parameters(run_trial, base=base,
                                         sweep={**dataclasses.asdict(cfg), "_parent_run_id": parent.run_id,
                                                "_tracking_uri": parent.tracking_uri})
        # The trial function only drives: its TorchTrainer and scoring actor hold the real
        # resources. (Tune rejects an empty request, hence a token share of a CPU.)
        trainable = tune.with_resources(trainable, {"CPU": 0.01})
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=str(Path(cfg.run_dir) / "tune"), name=cfg.sweep_name,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"sweep {cfg.sweep_name}: {len(errors)} trial(s) failed; first: {errors[0]}")
        rows = [{**{k: r.config[k] for k in PARAMS}, **{k: v for k, v in r.metrics.items() if "/" in k}}
                for r in grid]
        trials = pd.DataFrame(rows)
        table = aggregate(trials, keys)
        trials.to_csv(out_dir / "trials.csv", index=False)
        table.to_csv(out_dir / f"{cfg.space}.csv", index=False)
        (out_dir / f"{cfg.space}.md").write_text(to_markdown(table, keys))
        parent.log_table(trials, "tables/trials.json")
        parent.log_table(table, f"tables/{cfg.space}.json")
        parent.log_artifact(out_dir / f"{cfg.space}.md", "tables")
        for _, r in table[table["method"] == "model"].iterrows():
            tag = "/".join(f"{k}:{r[k]}" for k in keys)  # MLflow metric names admit ":" but not "="
            parent.log_metrics({f"sweep/{tag}/{m}": float(r[m]) for m in METRICS if m in table.columns}, step=0)
    print(to_markdown(table, keys), flush=True)
    return table


if __name__ == "__main__":
    main(parse_config(SweepConfig))
