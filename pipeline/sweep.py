"""Stage: Ray Tune sweeps over the paper's ablations, aggregated into Tables 2-4.

    python -m pipeline.sweep --run-dir /abs/runs/x --data-root /abs/data \\
        --vae-path /abs/runs/x/models/vae --space ablations --seeds 0 1 2 --dit '{"dit_preset": "S", ...}'

Each trial is a function (Train V2 style: Tune runs a function that builds and fits the
TorchTrainer; `Tuner(TorchTrainer(...))` is rejected) that trains one DiT on the frozen VAE, scores
it on the held-out windows of `eval_split`, and reports the scores with `ray.tune.report`.

What a trial trains: the sweep's DiT settings (`SweepConfig.dit`, in the job the preset's `dit`)
with only the space's swept settings replaced (`tune_spaces/`: a space holds nothing but what it
sweeps). A scalar among `overrides` may name the game, never replace a DiT setting of the preset's
(given or by default): changing one is sweeping it, as a list. Where the space sweeps `horizon`, a trial trains that one generation length
and is scored at it; otherwise it trains the preset's lengths (`horizon_choices`) and is scored at
each. Every trial config is built, and refused naming the field, before Tune starts.

Records: scored on the test split, each trial writes `<run_dir>/results/<run-id>/` as a job's
evaluation does (`pipeline/results.py:record_run`), with its variant (action_mode, action_encoder),
seed and the sweep version (`sweep_version`: a hash of the settings that define what the sweep's
trials train and how they are scored, not of seeds, games, resources or names), so that the trials
of one game may be spread over several jobs and still pool (`python -m pipeline.results ablations`
builds Tables 3 and 4 from them). In a job, the job's own evaluations stand for the trials that
would train the same DiT and score it alike (`reference_records`: the reference variant's trials of
the job's seeds), so that no DiT is trained twice.

MLflow: the sweep is a parent run; each trial is a child run (tag `mlflow.parentRunId`) holding its
settings, its training curve and its scores. Trials open their child run by name before training,
and training and evaluation continue that same run (runs are found by name, see
`pipeline/tracking.py`). After all trials, the parent run gets the aggregated tables (mean ± std
over seeds, with the copy-last row and the action-fidelity measures) as MLflow tables, and
`<run_dir>/sweeps/<name>/` gets them as CSV and Markdown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/sweep.py`): run again as `python -m pipeline.sweep`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.sweep", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import pandas as pd

from models.action_encoder import ENCODER_KINDS
from models.config import config_from_dict
from pipeline import cli
from pipeline.cluster import ensure_ray, require_lpips_weights
from pipeline.tracking import Tracker
from tune_spaces.spaces import BUNDLES, SWEEPS, expand_bundles, grid, is_grid, space_for, swept
from workers.train_dit import TrainDiTConfig

METRICS = ("mse", "psnr", "lpips")
ACTION_MEASURES = ("dpsnr_vs_permuted", "dpsnr_vs_noop", "idm_acc_generated", "idm_f1_generated", "idm_acc_real",
                   "idm_acc_ratio", "idm_kappa_ratio")
"""Action-fidelity measures of the evaluation (`pipeline/stats.py:action_rows`) that every trial row carries."""

SWEEP_OWNED = frozenset({"run_dir", "data_root", "vae_path", "name", "use_gpu", "gpus_per_worker", "horizon_choices"})
"""Training fields the sweep sets itself: never swept, never fixed by a space."""

# Settings that do not change what a trial trains or how it is scored: where it runs, with what
# resources, under which names, and the seeds and games (a version's seeds and games pool): the
# fields that the preset version (`pipeline/presets/base.py`) leaves out, and the collection's checkpoint path.
_UNVERSIONED = frozenset({"run_dir", "data_root", "name", "game", "games", "run_id", "vae_path", "model_path", "seed",
                          "num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "num_cpus", "num_gpus",
                          "figure_windows",
                          "action_sequences", "windows_of", "checkpoint_every", "log_every", "num_env_runners",
                          "cpus_per_env_runner", "gpus_per_env_runner", "learner_threads", "learner_device",
                          "steps_per_round", "data_loader", "checkpoint"})


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
    """Ablation grid, a key of tune_spaces.SWEEPS."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds of every grid point (mean ± std over them); also each trial's sampling seed."""
    games: tuple[str, ...] = ()
    """Games the trials train on where the space does not name the game (each game gets the whole
    grid); () = every game collected under `data_root`."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Grid overrides, e.g. {"horizon": [1, 2], "game": "Breakout"} (a list sweeps; a scalar names
    the game, or repeats a value `dit` already has: it never replaces one)."""
    dit: dict[str, Any] = dataclasses.field(default_factory=dict)
    """TrainDiTConfig fields of every trial (in the job: the preset's `dit`); a trial changes only
    the fields its space sweeps."""
    name: str = ""
    """Sweep name (Tune experiment and MLflow parent run); empty = `sweep-<space>`."""
    eval_max_windows: int = 64
    """Held-out windows scored per trial."""
    eval_stride: int = 16
    """Stride of the evaluation windows."""
    eval_lpips: bool = True
    """Score LPIPS in the trials."""
    eval_split: str = "val"
    """Split the trials are scored on: `val` while choosing, `test` for a reported table (each trial
    scored on test writes its record under `<run_dir>/results/`)."""
    eval_idm_steps: int = 2000
    """Training steps of the inverse-dynamics model that reads every trial's rollouts (trained once
    per collection and game, shared by the trials; 0 = none)."""
    eval_idm_max_pairs: int = 8192
    """Real training pairs that inverse-dynamics model sees at most."""
    eval_batch_size: int = 8
    """Windows per model call in a trial's evaluation."""
    eval_num_cpus: float = 0.5
    """CPUs of a trial's scoring actor."""
    max_concurrent_trials: int = 1
    """Trials run at once (each holds its TorchTrainer's workers, then its scoring actor)."""
    use_gpu: bool = False
    """Train and evaluate every trial on a GPU."""
    trials_per_gpu: int = 1
    """Trials that share one GPU: each trial's training workers and scoring actor ask for
    1/trials_per_gpu of it (`TrainDiTConfig.gpus_per_worker`, `EvalConfig.num_gpus`); set
    `max_concurrent_trials` to match. Whether sharing finishes more trials an hour is measured, not
    assumed."""
    reference_records: tuple[str, ...] = ()
    """Records of the job's own evaluations (`<run_dir>/results/<run-id>/`, written by `run_all`)
    that may stand for trials: a trial whose game, seed, DiT settings and scoring equal a record's
    (in a job, the reference variant's trials: the preset's DiT) is not trained again; its row and
    its trial record are that evaluation's (`reused_from` names it). Others train as usual."""

    def __post_init__(self) -> None:
        if self.space not in SWEEPS:
            raise ValueError(f"SweepConfig.space={self.space!r}; known spaces: {sorted(SWEEPS)}")
        from workers.schema import SPLITS

        if self.eval_split not in SPLITS:
            raise ValueError(f"SweepConfig.eval_split={self.eval_split!r} is no split; splits are {list(SPLITS)}")
        for name in ("overrides", "dit"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"SweepConfig.{name} must be a dict of settings by name, got {value!r}")
        if self.trials_per_gpu < 1:
            raise ValueError(f"SweepConfig.trials_per_gpu={self.trials_per_gpu} must be >= 1")

    @property
    def sweep_name(self) -> str:
        return self.name or f"sweep-{self.space}"


class SweepError(ValueError):
    """A sweep definition that would not train what it says; raised before any trial starts."""


# -- what each trial trains ----------------------------------------------------------------------------
def _overrides(cfg: SweepConfig) -> dict[str, Any]:
    return dict(cfg.overrides)  # a copy: the frozen config's own dict stays as given


def _base(cfg: SweepConfig) -> dict[str, Any]:
    return dict(cfg.dit)


def collected_games(data_root: str) -> tuple[str, ...]:
    """The games with episodes under a data root (`<data_root>/episodes/game=<G>/`)."""
    root = Path(data_root) / "episodes"
    return tuple(sorted(p.name.split("=", 1)[1] for p in root.glob("game=*") if p.is_dir()))


def trial_fields(space: dict[str, Any]) -> tuple[str, ...]:
    """The training fields a space's trials change (bundles expanded), seed and game excepted, in the
    space's order."""
    out: list[str] = []
    for key in swept(space):
        if key == "game":
            continue
        members = [f for settings in BUNDLES[key].values() for f in settings] if key in BUNDLES else [key]
        out.extend(f for f in members if f not in out)
    return tuple(out)


def table_keys(space: dict[str, Any]) -> tuple[str, ...]:
    """The columns that tell a sweep table's rows apart: the game where it is swept, the swept
    settings, and the generation length `horizon` (the T each row is scored at) last."""
    fields = [f for f in trial_fields(space) if f != "horizon"]
    return (("game",) if "game" in swept(space) else ()) + tuple(fields) + ("horizon",)


def _check_space(name: str, space: dict[str, Any], base: dict[str, Any]) -> None:
    """Every key a training field the sweep may set; a fixed (scalar) entry never replaces a setting
    of the preset's, given or by default (the game excepted: a sweep names its own)."""
    known = {f.name for f in dataclasses.fields(TrainDiTConfig)}
    if "game" in base:
        raise SweepError(f"sweep {name!r}: SweepConfig.dit sets game={base['game']!r}; name the games with "
                         f"SweepConfig.games or in the overrides")
    try:
        resolved = dataclasses.asdict(config_from_dict(TrainDiTConfig, base))
    except (TypeError, ValueError) as exc:
        raise SweepError(f"sweep {name!r}: SweepConfig.dit: {exc}") from None
    for key, entry in space.items():
        fields = sorted({f for s in BUNDLES[key].values() for f in s}) if key in BUNDLES else [key]
        for field in fields:
            if field not in known:
                raise SweepError(f"sweep {name!r}: swept field {field!r} is no TrainDiTConfig field "
                                 f"(workers/train_dit.py); a typo?")
            if field in SWEEP_OWNED:
                raise SweepError(f"sweep {name!r}: {field!r} is set by the sweep itself and cannot be swept")
        if not is_grid(entry) and key != "game" and key in resolved and resolved[key] != entry:
            raise SweepError(f"sweep {name!r}: overrides fix {key}={entry!r}, but the sweep's DiT settings "
                             f"(the preset's) have {key}={resolved[key]!r}: a fixed value never replaces the "
                             f"preset's; sweep it as a list ([{entry!r}]) to change it on purpose")


def sweep_space(cfg: SweepConfig, collected: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The Tune param_space of a sweep: the space's swept settings (narrowed or extended by
    `overrides`), the seed grid, and the game(s): the space's, else `games`, else the collected ones
    (`collected`, default: those under `data_root`). Named games must be collected."""
    overrides = _overrides(cfg)
    try:
        space = space_for(cfg.space, seeds=cfg.seeds, overrides=overrides)
    except (KeyError, ValueError) as exc:
        raise SweepError(f"sweep {cfg.sweep_name!r}: {exc.args[0]}") from None
    have = collected_games(cfg.data_root) if collected is None else tuple(collected)
    if "game" in space:
        if cfg.games:
            raise SweepError(f"sweep {cfg.sweep_name!r}: the game is set twice, by the space/overrides "
                             f"({space['game']}) and by SweepConfig.games={cfg.games}")
        games = tuple(space["game"]["grid_search"]) if is_grid(space["game"]) else (space["game"],)
    else:
        games = tuple(cfg.games) or have
        if not games:
            raise SweepError(f"sweep {cfg.sweep_name!r}: no game: none collected under {cfg.data_root!r} "
                             f"and none named (SweepConfig.games)")
        space["game"] = grid(games) if len(games) > 1 else games[0]
    missing = [g for g in games if g not in have]
    if missing:
        raise SweepError(f"sweep {cfg.sweep_name!r}: game(s) {missing} have no episodes under "
                         f"{cfg.data_root!r} (collected: {list(have)})")
    _check_space(cfg.sweep_name, space, _base(cfg))
    return space


def trial_settings(base: dict[str, Any], params: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A trial's DiT settings: the sweep's (`base`) with only the swept ones (`params`, a resolved
    grid point with bundles such as `variant` still named) replaced. A trial of a swept `horizon`
    trains that one length."""
    settings = {**base, **expand_bundles(params)}
    if "horizon" in fields:
        settings["horizon_choices"] = ()
    return settings


def trial_name(sweep: str, cfg: TrainDiTConfig, extra: dict[str, Any] | None = None) -> str:
    """The trial's run name (Ray Train resume key, MLflow child run, evaluation folder): every
    setting a table tells trials apart by, and the swept settings beyond those (`extra`)."""
    T = "-".join(str(h) for h in cfg.trained_horizons)
    tail = "".join(f"-{k}{v}" for k, v in sorted((extra or {}).items()))
    return (f"{sweep}-{cfg.game}-T{T}-{cfg.action_mode}-{cfg.action_encoder}-{cfg.dit_preset}-k{cfg.sample_steps}"
            f"{tail}-s{cfg.seed}")


_NAMED = {"game", "horizon", "action_mode", "action_encoder", "dit_preset", "sample_steps", "seed"}


def build_trial(cfg: SweepConfig, base: dict[str, Any], params: dict[str, Any],
                fields: tuple[str, ...]) -> TrainDiTConfig:
    """The TrainDiTConfig one grid point trains (refused, naming the field, when invalid)."""
    settings = trial_settings(base, params, fields)
    extra = {k: v for k, v in expand_bundles(params).items() if k not in _NAMED}
    dit = config_from_dict(TrainDiTConfig, {**settings, "run_dir": cfg.run_dir, "data_root": cfg.data_root,
                                            "vae_path": cfg.vae_path, "use_gpu": cfg.use_gpu,
                                            "gpus_per_worker": 1.0 / cfg.trials_per_gpu})
    if dit.max_train_s > 0:
        raise SweepError(f"sweep {cfg.sweep_name!r}: trials train to step budgets, not clocks "
                         f"(max_train_s={dit.max_train_s}): a clock gives the slower variant fewer steps, and "
                         f"runs on other GPUs would not pool; set max_train_s=0 and `steps`")
    if dit.action_encoder not in ENCODER_KINDS:  # TrainDiTConfig leaves this to the model's build
        raise SweepError(f"sweep {cfg.sweep_name!r}: action_encoder={dit.action_encoder!r} is not one of "
                         f"{list(ENCODER_KINDS)}")
    return dataclasses.replace(dit, name=trial_name(cfg.sweep_name, dit, extra))


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: its param_space, the fields its trials change, and every trial's config."""

    space: dict[str, Any]
    fields: tuple[str, ...]
    keys: tuple[str, ...]
    base: dict[str, Any]
    trials: tuple[tuple[dict[str, Any], TrainDiTConfig], ...]
    version: str
    reused: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """{trial name: the job evaluation that stands for it} (`reference_records`)."""


def plan_sweep(cfg: SweepConfig, collected: tuple[str, ...] | None = None) -> SweepPlan:
    """Every trial config of a sweep, built and checked without starting anything: unknown or
    invalid settings fail here, naming the field."""
    from ray.tune.search.variant_generator import generate_variants

    space = sweep_space(cfg, collected)
    fields = trial_fields(space)
    base = _base(cfg)
    if "use_gpu" in base and bool(base["use_gpu"]) != cfg.use_gpu:
        raise SweepError(f"sweep {cfg.sweep_name!r}: SweepConfig.use_gpu={cfg.use_gpu}, but the sweep's DiT "
                         f"settings (the preset's) have use_gpu={base['use_gpu']}: set SweepConfig.use_gpu to match")
    trials = []
    for _, params in generate_variants(space):
        try:
            trials.append((dict(params), build_trial(cfg, base, params, fields)))
        except SweepError:
            raise
        except (TypeError, ValueError) as exc:  # the training config's own checks, for this grid point
            raise SweepError(f"sweep {cfg.sweep_name!r}: trial {dict(params)}: {exc}") from None
    names = [t.name for _, t in trials]
    if len(set(names)) != len(names):
        raise SweepError(f"sweep {cfg.sweep_name!r}: two trials share a name: {sorted(names)}")
    return SweepPlan(space=space, fields=fields, keys=table_keys(space), base=base, trials=tuple(trials),
                     version=sweep_version(cfg), reused=reused_trials(cfg, trials))


# -- trials the job has already run ----------------------------------------------------------------------
def trial_eval_config(cfg: SweepConfig, dit: TrainDiTConfig, model_path: str) -> Any:
    """The EvalConfig that scores a trial: its trained lengths on `eval_split`, sampled with its seed."""
    from pipeline.evaluate import EvalConfig

    return EvalConfig(
        run_dir=cfg.run_dir, model_path=model_path, data_root=cfg.data_root, games=(dit.game,), name=dit.name,
        horizons=dit.trained_horizons, stride=cfg.eval_stride, max_windows=cfg.eval_max_windows,
        batch_size=cfg.eval_batch_size, lpips=cfg.eval_lpips, idm_steps=cfg.eval_idm_steps,
        idm_max_pairs=cfg.eval_idm_max_pairs, split=cfg.eval_split, seed=dit.seed,
        figure_windows=1, action_sequences=(), num_cpus=cfg.eval_num_cpus, use_gpu=cfg.use_gpu,
        num_gpus=1.0 / cfg.trials_per_gpu)


def _plain(d: Any) -> Any:
    return json.loads(json.dumps(d, default=list))  # tuples as lists, as a record stores them


def inputs_digest(data_root: str, vae_path: str) -> str:
    """A digest of what a DiT trains and is scored on besides its settings: the VAE's weights
    (`vae.pt`) and the collection's manifests (`<data_root>/runs/*.json`, rewritten by every
    collection). Equal digests: the same VAE and the same data."""
    h = hashlib.sha1()
    vae = Path(vae_path, "vae.pt")
    h.update(vae.read_bytes() if vae.is_file() else b"no vae.pt")
    for f in sorted(Path(data_root, "runs").glob("*.json")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def reuse_mismatch(cfg: SweepConfig, dit: TrainDiTConfig, meta: dict[str, Any], digest: str | None = None
                   ) -> str | None:
    """Why a job's evaluation record (`meta`, its run.json) cannot stand for the trial `dit`, or None
    when it can: a job's record (not a trial's) of the same game and seed, on the sweep's collection
    and VAE (`digest`, `inputs_digest` of the sweep's, against the record's), whose DiT was trained
    with the trial's settings and scored as the trial would be."""
    from pipeline.presets.base import EVAL_VERSIONED
    from pipeline.results import TRIAL_KIND

    if meta.get("kind") == TRIAL_KIND:
        return "a sweep trial's record, not a job's evaluation"
    if digest is not None and meta.get("inputs_digest") != digest:
        return (f"trained and scored on another collection or VAE than the sweep's (inputs digest "
                f"{meta.get('inputs_digest')}, the sweep's {digest})")
    if meta.get("test_set", "test") != "test":
        return f"scored on the {meta['test_set']} test set, not the collection's"
    if not meta.get("eval_dir") or not Path(meta["eval_dir"], f"{meta.get('game')}_scores.npz").is_file():
        return "no evaluation folder recorded (eval_dir)"
    if (meta.get("game"), int(meta.get("seed", -1))) != (dit.game, dit.seed):
        return f"{meta.get('game')} seed {meta.get('seed')}, not {dit.game} seed {dit.seed}"
    if meta.get("split") != cfg.eval_split:
        return f"scored on {meta.get('split')!r}, the trials on {cfg.eval_split!r}"
    settings = meta.get("settings") or {}
    job, trial = _versioned(_plain(settings.get("dit", {}))), _versioned(_plain(dataclasses.asdict(dit)))
    differ = sorted(k for k in set(job) | set(trial) if job.get(k) != trial.get(k))
    if differ:
        return "its DiT differs in " + ", ".join(f"{k} ({job.get(k)!r} vs {trial.get(k)!r})" for k in differ)
    scored = _plain(settings.get("evaluate", {}))
    want = _plain(dataclasses.asdict(trial_eval_config(cfg, dit, "")))
    differ = sorted(k for k in (*EVAL_VERSIONED, "seed") if scored.get(k) != want.get(k))
    if differ:
        return "scored differently: " + ", ".join(f"{k} ({scored.get(k)!r} vs {want.get(k)!r})" for k in differ)
    return None


def reused_trials(cfg: SweepConfig, trials: list[tuple[dict[str, Any], TrainDiTConfig]]) -> dict[str, dict[str, Any]]:
    """{trial name: record} for the trials a `reference_records` entry stands for (the first that
    matches); every record must lie under `<run_dir>/results/`, where the sweep's collection and
    VAE are the ones its DiT used. A record that serves no trial is reported, not an error."""
    records = []
    for r in cfg.reference_records:
        path = Path(r).expanduser().resolve()
        if path.parent != Path(cfg.run_dir, "results").resolve():
            raise SweepError(f"sweep {cfg.sweep_name!r}: reference record {r} is not under {cfg.run_dir}/results: "
                             f"only the job's own evaluations share the sweep's collection and VAE")
        if not (path / "run.json").is_file():
            raise SweepError(f"sweep {cfg.sweep_name!r}: reference record {r} has no run.json")
        records.append((path, json.loads((path / "run.json").read_text())))
    reused: dict[str, dict[str, Any]] = {}
    digest = inputs_digest(cfg.data_root, cfg.vae_path) if records else None
    for path, meta in records:
        why = {}
        for _, dit in trials:
            if dit.name in reused:
                continue
            why[dit.name] = reuse_mismatch(cfg, dit, meta, digest)
            if why[dit.name] is None:
                reused[dit.name] = {"record": str(path), "run_id": meta.get("run_id", path.name),
                                    "eval_dir": meta["eval_dir"], "game": meta["game"]}
                print(f"[sweep] {dit.name}: the job's evaluation {path.name} stands for it (not trained again)",
                      flush=True)
                break
        else:
            same = [dit.name for _, dit in trials if (dit.game, dit.seed) == (meta.get("game"), meta.get("seed"))]
            reason = (why.get(same[0]) or "its trial is served by another record") if same else \
                f"no trial of {meta.get('game')} seed {meta.get('seed')}"
            print(f"[sweep] job evaluation {path.name} stands for no trial: {reason}", flush=True)
    return reused


# -- versions --------------------------------------------------------------------------------------------
def _versioned(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _versioned(v) for k, v in sorted(d.items()) if k not in _UNVERSIONED}
    return d


def _hash(blob: Any) -> str:
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()[:10]


def _space_without_games(cfg: SweepConfig) -> dict[str, Any]:
    return space_for(cfg.space, seeds=cfg.seeds, overrides={k: v for k, v in _overrides(cfg).items() if k != "game"})


def swept_fields(cfg: SweepConfig) -> tuple[str, ...]:
    """The training fields a sweep's trials change (`trial_fields`), from its settings alone."""
    return trial_fields(_space_without_games(cfg))


def sweep_version(cfg: SweepConfig) -> str:
    """A short hash of what defines a sweep's trials: the fields they change, every other DiT setting
    (resolved, defaults included), and how they are scored. Not the swept values, seeds, games,
    split, resources or names: trials of one version pool into one table whichever job ran them (a
    narrower grid in another job, other seeds, another game). Pure: computable from the preset."""
    space = _space_without_games(cfg)
    fields = trial_fields(space)
    fixed = {k: v for k, v in space.items() if not is_grid(v)}
    settings = {**_base(cfg), **fixed, **({"horizon_choices": ()} if "horizon" in fields else {})}
    resolved = dataclasses.asdict(config_from_dict(TrainDiTConfig, settings))
    scoring = {"max_windows": cfg.eval_max_windows, "stride": cfg.eval_stride, "lpips": cfg.eval_lpips,
               "idm_steps": cfg.eval_idm_steps, "idm_max_pairs": cfg.eval_idm_max_pairs, "action_tests": True}
    from pipeline.presets.base import REVISION

    return _hash({"fields": sorted(fields), "trial": {k: v for k, v in _versioned(resolved).items() if k not in fields},
                  "scoring": scoring, **({"revision": REVISION} if REVISION > 1 else {})})


def preset_sweep_config(preset: Any, space: str, fields: dict[str, Any]) -> SweepConfig:
    """A preset's sweep entry as the job runs it (`pipeline/run_all.py`: its trials train the preset's
    own DiT, `dit`), without the job's paths: what `sweep_version` of a preset's sweep is computed from."""
    return config_from_dict(SweepConfig, {**fields, "dit": dict(preset.dit), "space": space})


def upstream(cfg: SweepConfig) -> dict[str, Any]:
    """The settings of what the trials share and the sweep does not define: the collection (its
    manifests under `data_root/runs/`), the VAE's architecture (`vae.json`) and, when the sweep runs
    in a `run_all` job, that job's VAE stage settings; with `version`, their hash (trials of one
    table pool only where it matches)."""
    collections = []
    for f in sorted(Path(cfg.data_root, "runs").glob("*.json")):
        try:
            collections.append(_versioned(json.loads(f.read_text()).get("config", {})))
        except (OSError, json.JSONDecodeError):
            continue
    vae_json = Path(cfg.vae_path, "vae.json")
    vae = json.loads(vae_json.read_text()) if vae_json.is_file() else {}
    stage = Path(cfg.run_dir, "stages", "vae.json")
    vae_stage = _versioned(json.loads(stage.read_text()).get("settings") or {}) if stage.is_file() else {}
    out = {"collection": collections, "vae": vae, "vae_stage": vae_stage}
    return {**out, "version": _hash(out)}


# -- one trial -------------------------------------------------------------------------------------------
def _trial_metrics(tables: dict[str, pd.DataFrame], horizons: tuple[int, ...]) -> dict[str, float]:
    """`T<h>/<method>/<metric>` and `T<h>/action/<measure>` of an evaluation's tables."""
    out: dict[str, float] = {}
    df = tables["generation_length"]
    for h in horizons:
        row = df[df["generation_length"] == h].set_index("method")
        out.update({f"T{h}/{method}/{m}": float(row.loc[method, m])
                    for method in row.index for m in METRICS if m in row.columns})
    af = tables.get("action_fidelity")
    if af is not None and len(af):
        for _, r in af.iterrows():
            if int(r["T"]) in horizons:
                out.update({f"T{int(r['T'])}/action/{k}": float(r[k]) for k in ACTION_MEASURES
                            if k in r.index and pd.notna(r[k])})
    return out


def record_trial(cfg: SweepConfig, dit: TrainDiTConfig, eval_cfg: Any, params: dict[str, Any], *,
                 version: str, fields: tuple[str, ...], walls: dict[str, float], command: str,
                 eval_dir: str | Path | None = None, reused_from: str = "") -> Path:
    """The trial's record (`pipeline/results.py:record_run`) under `<run_dir>/results/`: its scores, its
    variant, seed and sweep version, and the settings of what it trained and shared; for a trial a
    job's evaluation stands for, that evaluation's scores (`eval_dir`) and its run id (`reused_from`)."""
    from pipeline.results import TRIAL_KIND, record_run

    game = dit.game
    up = upstream(cfg)
    extra = {"kind": TRIAL_KIND,
             "sweep": {"name": cfg.sweep_name, "space": cfg.space, "version": version, "fields": list(fields),
                       "params": params, "trial": dit.name},
             "variant": {"action_mode": dit.action_mode, "action_encoder": dit.action_encoder},
             "horizons": list(eval_cfg.horizons), "trained_horizons": list(dit.trained_horizons),
             "upstream_version": up.pop("version"), "upstream": up}
    if reused_from:
        extra["reused_from"] = reused_from
    settings = {"dit": dataclasses.asdict(dit), "evaluate": dataclasses.asdict(eval_cfg),
                "sweep": dataclasses.asdict(cfg)}
    tag = f"{dit.action_mode}-{dit.action_encoder}-T{'-'.join(map(str, dit.trained_horizons))}"
    scores = Path(eval_dir or Path(cfg.run_dir) / "eval" / dit.name) / f"{game}_scores.npz"
    return record_run(Path(cfg.run_dir) / "results", scores,
                      preset=cfg.sweep_name, version=version, game=game, seed=dit.seed, split=eval_cfg.split,
                      settings=settings, stage_walls=walls, command=command, extra=extra, tag=tag)


def _reused_tables(eval_dir: str) -> dict[str, pd.DataFrame]:
    """The tables a job's evaluation wrote (`<name>.csv`) that a trial reports."""
    out = {}
    for name in ("generation_length", "action_fidelity"):
        f = Path(eval_dir, f"{name}.csv")
        if f.is_file():
            out[name] = pd.read_csv(f)
    if "generation_length" not in out:
        raise FileNotFoundError(f"{eval_dir}: no generation_length.csv: the job's evaluation did not complete")
    return out


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: train the DiT of `params`, evaluate it, record it (test split), report the scores."""
    from ray import tune

    from pipeline import evaluate
    from pipeline.train import train_dit_main

    uri, parent_id = sweep["_tracking_uri"], sweep["_parent_run_id"]
    fields, version = tuple(sweep["_fields"]), sweep["_version"]
    cfg = SweepConfig(**{k: v for k, v in sweep.items() if not k.startswith("_")})
    params = dict(params)
    dit_cfg = build_trial(cfg, base, params, fields)
    name = dit_cfg.name
    # The child run exists, tagged with its parent, before training opens it again by name.
    reused = sweep["_reused"].get(name)
    tags = {"mlflow.parentRunId": parent_id, "sweep": cfg.sweep_name, "sweep_version": version, "job": "trial"}
    if reused:
        tags["reused_from"] = reused["run_id"]
    with Tracker(cfg.run_dir, name, tracking_uri=uri, tags=tags) as tracker:
        tracker.log_params({f"trial.{k}": v for k, v in params.items()})
    if reused:  # the job trained and scored this very trial: its scores are the trial's
        eval_cfg = trial_eval_config(cfg, dit_cfg, "")
        tables = _reused_tables(reused["eval_dir"])
        metrics = _trial_metrics(tables, dit_cfg.trained_horizons)
        with Tracker(cfg.run_dir, name, tracking_uri=uri) as tracker:
            tracker.log_metrics(metrics, step=0)
        if cfg.eval_split == "test":
            record = record_trial(cfg, dit_cfg, eval_cfg, params, version=version, fields=fields, walls={},
                                  command=sweep["_command"], eval_dir=reused["eval_dir"],
                                  reused_from=reused["run_id"])
            print(f"[sweep] {name}: the job's evaluation {reused['run_id']}, recorded in {record}", flush=True)
        tune.report(metrics)
        return
    t0 = time.time()
    model_path = train_dit_main(dit_cfg, tracking_uri=uri)
    t1 = time.time()
    eval_cfg = trial_eval_config(cfg, dit_cfg, str(model_path))
    tables = evaluate.main(eval_cfg, tracking_uri=uri)
    walls = {"dit": round(t1 - t0, 1), "evaluate": round(time.time() - t1, 1)}
    if cfg.eval_split == "test":
        record = record_trial(cfg, dit_cfg, eval_cfg, params, version=version, fields=fields, walls=walls,
                              command=sweep["_command"])
        print(f"[sweep] {name}: recorded in {record}", flush=True)
    tune.report(_trial_metrics(tables, dit_cfg.trained_horizons))


# -- tables ----------------------------------------------------------------------------------------------
_T_METRIC = re.compile(r"^T(\d+)/(.+)$")


def trial_rows(plan: SweepPlan, cfg: SweepConfig, results: list[tuple[dict[str, Any], dict[str, Any]]]
               ) -> pd.DataFrame:
    """(trial params, reported metrics) -> one row per trial and generation length scored: the trial's
    settings (variant included), `horizon` = that length, and its `<method>/<metric>`, `action/<measure>`."""
    rows = []
    for params, metrics in results:
        dit = build_trial(cfg, plan.base, params, plan.fields)
        by_t: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            m = _T_METRIC.match(key)
            if m:
                by_t.setdefault(int(m.group(1)), {})[m.group(2)] = value
        for T in sorted(by_t):
            rows.append({"game": dit.game, "horizon": T, "action_mode": dit.action_mode,
                         "action_encoder": dit.action_encoder, "seed": dit.seed,
                         **{k: v for k, v in params.items() if k not in BUNDLES and k not in ("game", "horizon")},
                         "trial": dit.name, "train_horizon": dit.horizon, **by_t[T]})
    return pd.DataFrame(rows)


def aggregate(results: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Trial rows (settings + `<method>/<metric>` scores, and optionally `action/<measure>`) -> one row
    per (method, keys): mean and std over seeds, and the number of seeds. Action-fidelity measures
    belong to the model's rows."""
    score_cols = [c for c in results.columns if "/" in c and c.split("/")[1] in METRICS]
    long = results.melt(id_vars=list(keys) + ["seed"], value_vars=score_cols, var_name="score")
    long["method"] = long["score"].str.split("/").str[0]
    long["metric"] = long["score"].str.split("/").str[1]
    action_cols = [c for c in results.columns if c.startswith("action/") and c.split("/", 1)[1] in ACTION_MEASURES]
    if action_cols:
        act = results.melt(id_vars=list(keys) + ["seed"], value_vars=action_cols, var_name="score")
        act["method"], act["metric"] = "model", act["score"].str.split("/").str[1]
        long = pd.concat([long, act], ignore_index=True)
    long = long.dropna(subset=["value"])
    grouped = long.groupby(["method", *keys, "metric"])["value"]
    stats = grouped.agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)  # one seed: no spread
    wide = stats.pivot_table(index=["method", *keys], columns="metric", values=["mean", "std"])
    wide.columns = [m if s == "mean" else f"{m}_std" for s, m in wide.columns]
    wide = wide.reset_index()
    seeds = stats[stats["metric"].isin(METRICS)].groupby(["method", *keys])["count"].max().rename("seeds")
    wide = wide.merge(seeds.reset_index(), on=["method", *keys], how="left")
    order = {"model": 0, "copy_last": 1}
    wide["_o"] = wide["method"].map(order).fillna(2)
    return wide.sort_values([*keys[:-1], keys[-1], "_o"]).drop(columns="_o").reset_index(drop=True)


_MD_ACTION = (("dpsnr_vs_permuted", "dB vs permuted", 2), ("idm_acc_generated", "IDM acc.", 3))


def to_markdown(table: pd.DataFrame, keys: tuple[str, ...]) -> str:
    """Paper-style table: `mean ± std` cells, the copy-last baseline on its own rows, and the action
    measures (dB of recorded over permuted actions, inverse-dynamics accuracy) on the model's."""
    actions = [(c, title, d) for c, title, d in _MD_ACTION if c in table.columns]
    cols = [*keys, "method"] + [m for m in METRICS if m in table.columns] + [t for _, t, _ in actions] + ["seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [r["method"]]
        for m in METRICS:
            if m in table.columns:
                digits = 4 if m == "lpips" else 2
                cells.append(f"{r[m]:.{digits}f} ± {r[m + '_std']:.{digits}f}")
        for c, _, digits in actions:
            cells.append("" if pd.isna(r[c]) else f"{r[c]:.{digits}f} ± {r[c + '_std']:.{digits}f}")
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
    plan = plan_sweep(cfg)  # every trial's config, checked before Ray or Tune start
    print(f"[sweep] {cfg.sweep_name}: {len(plan.trials)} trials ({len(plan.reused)} served by the job's own "
          f"evaluations), version {plan.version}, changing {list(plan.fields) or 'nothing but the seed'} of the DiT "
          f"settings; scored on {cfg.eval_split}", flush=True)
    ensure_ray()
    if cfg.eval_lpips:
        require_lpips_weights(cfg.use_gpu)  # before any trial trains a model it could not score
    out_dir = Path(cfg.run_dir) / "sweeps" / cfg.sweep_name
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = plan.keys

    with Tracker(cfg.run_dir, cfg.sweep_name, tracking_uri=tracking_uri,
                 tags={"job": "sweep", "space": cfg.space, "sweep_version": plan.version}) as parent:
        parent.log_params(cfg)
        trainable = tune.with_parameters(run_trial, base=plan.base,
                                         sweep={**dataclasses.asdict(cfg), "_parent_run_id": parent.run_id,
                                                "_tracking_uri": parent.tracking_uri, "_fields": list(plan.fields),
                                                "_version": plan.version, "_reused": plan.reused,
                                                "_command": " ".join([os.path.basename(sys.executable), *sys.argv])})
        # The trial function only drives: its TorchTrainer and scoring actor hold the real
        # resources. (Tune rejects an empty request, hence a token share of a CPU.)
        trainable = tune.with_resources(trainable, {"CPU": 0.01})
        tuner = tune.Tuner(
            trainable, param_space=plan.space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=str(Path(cfg.run_dir) / "tune"), name=cfg.sweep_name,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        result_grid = tuner.fit()
        errors = [r.error for r in result_grid if r.error is not None]
        if errors:
            raise RuntimeError(f"sweep {cfg.sweep_name}: {len(errors)} trial(s) failed; first: {errors[0]}")
        trials = trial_rows(plan, cfg, [(dict(r.config), dict(r.metrics)) for r in result_grid])
        table = aggregate(trials, keys)
        trials.to_csv(out_dir / "trials.csv", index=False)
        table.to_csv(out_dir / f"{cfg.space}.csv", index=False)
        (out_dir / f"{cfg.space}.md").write_text(to_markdown(table, keys))
        parent.log_table(trials, "tables/trials.json")
        parent.log_table(table, f"tables/{cfg.space}.json")
        parent.log_artifact(out_dir / f"{cfg.space}.md", "tables")
        logged = METRICS + ACTION_MEASURES
        for _, r in table[table["method"] == "model"].iterrows():
            tag = "/".join(f"{k}:{r[k]}" for k in keys)  # MLflow metric names admit ":" but not "="
            parent.log_metrics({f"sweep/{tag}/{m}": float(r[m]) for m in logged
                                if m in table.columns and pd.notna(r[m])}, step=0)
    print(to_markdown(table, keys), flush=True)
    return table


if __name__ == "__main__":
    cfg, uri = cli.parse_job(SweepConfig, description=__doc__)
    main(cfg, tracking_uri=uri)
