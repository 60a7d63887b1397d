"""A preset: the settings of every stage of one job, as the fields of each stage's config that
differ from its defaults; `--set section.field=value` replaces single ones; a version hashes the
resolved settings that decide what a run trains and how it is scored, so that runs pool by it.
Stage configs are imported where used: a preset is data, and reading one starts nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from models.config import config_from_dict


@dataclass(frozen=True)
class Preset:
    """The scale of a job: per-stage settings (field names of each stage's config)."""

    games: tuple[str, ...]
    """Games collected and modelled; the DiT trains on the first, evaluation scores all."""
    collect: dict[str, Any]
    """CollectConfig fields (plus `agent`: AgentConfig fields)."""
    vae: dict[str, Any]
    """TrainVAEConfig fields."""
    dit: dict[str, Any]
    """TrainDiTConfig fields."""
    evaluate: dict[str, Any]
    """EvalConfig fields."""
    sweeps: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(space, SweepConfig fields) per sweep; every sweep trains this preset's `dit` (its trials
    change only the fields their space sweeps)."""
    imagine: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ImagineConfig fields (pipeline/imagine.py): PPO trained in the world model, scored in the real game."""
    other_policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    """CollectConfig fields of the other-policy test set (the `other_policy` stage; policy `random`
    unless given): another policy's play of the DiT's game, under a data root of its own so that it
    never enters training, on which each seed's world model is scored again; {} = no such stage."""

    def __post_init__(self) -> None:
        for space, fields in self.sweeps:
            owned = sorted(set(fields) & SWEEP_JOB_FIELDS)
            if owned:
                raise ValueError(f"sweep {space!r} sets {owned}: a preset's sweep trains the preset's own DiT "
                                 f"(its `dit` section) on the job's data and VAE; change the DiT there, for "
                                 f"every stage at once")


SWEEP_JOB_FIELDS = frozenset({"dit", "run_dir", "data_root", "vae_path", "space", "reference_records"})
"""SweepConfig fields that the job sets for every sweep of a preset (`pipeline/run_all.py`): never a
preset's sweep entry or `--set sweep.<field>`."""


def section_configs() -> dict[str, type]:
    from pipeline import collect, evaluate, imagine, sweep
    from workers.rollout import AgentConfig
    from workers.train_dit import TrainDiTConfig
    from workers.train_vae import TrainVAEConfig

    return {"collect": collect.CollectConfig, "collect.agent": AgentConfig, "vae": TrainVAEConfig,
            "dit": TrainDiTConfig, "evaluate": evaluate.EvalConfig, "imagine": imagine.ImagineConfig,
            "sweep": sweep.SweepConfig, "other_policy": collect.CollectConfig}


def with_overrides(preset: Preset, sets: tuple[str, ...]) -> Preset:
    """The preset with `section.field=value` settings replaced (`--set`): section is collect,
    collect.agent, vae, dit, evaluate, imagine, other_policy or sweep (every sweep of the preset, e.g.
    `sweep.seeds=[0]` to run part of a grid); value is JSON (`16`, `[1, 2]`, `true`), else a string.
    An unknown section or field fails here, naming it, before anything runs."""
    sections = section_configs()
    parts = {name: dict(getattr(preset, name)) for name in ("collect", "vae", "dit", "evaluate", "imagine",
                                                          "other_policy")}
    sweeps = [(space, dict(fields)) for space, fields in preset.sweeps]
    for item in sets:
        key, eq, raw = item.partition("=")
        section, _, field = key.strip().rpartition(".")
        if not eq or not section or not field:
            raise SystemExit(f"--set {item!r}: expected section.field=value, e.g. vae.latent_channels=16")
        if section not in sections:
            raise SystemExit(f"--set {item!r}: unknown section {section!r}; sections are {sorted(sections)}")
        names = {f.name for f in dataclasses.fields(sections[section])}
        if field not in names:
            raise SystemExit(f"--set {item!r}: {sections[section].__name__} has no field {field!r}; "
                             f"fields are {sorted(names)}")
        if section == "sweep" and field in SWEEP_JOB_FIELDS:
            raise SystemExit(f"--set {item!r}: the job sets sweep.{field} itself" +
                             ("; a sweep trains the preset's DiT: change it with --set dit.<field>" if field == "dit"
                              else ""))
        if section == "sweep" and not sweeps:
            raise SystemExit(f"--set {item!r}: this preset has no sweep")
        if section == "sweep" and field == "name" and len(sweeps) > 1:
            raise SystemExit(f"--set {item!r}: the preset has {len(sweeps)} sweeps, which one name would merge")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if section == "collect.agent":  # a copy: the preset's own dict stays as it was
            parts["collect"]["agent"] = {**parts["collect"].get("agent", {}), field: value}
        elif section == "sweep":
            for space, fields in sweeps:
                fields[field] = value
                try:
                    from pipeline.sweep import SweepError, preset_sweep_config, swept_fields

                    swept_fields(preset_sweep_config(dataclasses.replace(preset, **parts), space, fields))
                except (TypeError, ValueError, KeyError, SweepError) as exc:
                    raise SystemExit(f"--set {item!r}: sweep {space!r}: {exc}") from None
        else:
            parts[section][field] = value
    return dataclasses.replace(preset, **parts, sweeps=tuple(sweeps))


# Fields that do not change what a run trains or how its Table 2 is scored: where it runs, with
# what resources, under which names, and the training seeds (seeds of one version pool).
_UNVERSIONED = {"run_dir", "data_root", "name", "game", "games", "run_id", "vae_path", "model_path", "seed",
                "num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "num_cpus", "num_gpus",
                "figure_windows",
                "action_sequences", "windows_of", "checkpoint_every", "log_every", "num_env_runners",
                "cpus_per_env_runner", "gpus_per_env_runner", "learner_threads", "learner_device",
                "steps_per_round", "data_loader"}
EVAL_VERSIONED = ("split", "horizons", "stride", "max_windows", "sample_steps", "guidance_scale", "lpips",
                   "vae_recon", "action_tests", "idm_steps", "idm_max_pairs")


def resolved_settings(preset: Preset) -> dict[str, dict[str, Any]]:
    """Every setting of the preset's configs, defaults included (what a run actually trains with)."""
    from pipeline import collect, evaluate
    from workers.rollout import AgentConfig
    from workers.train_dit import TrainDiTConfig
    from workers.train_vae import TrainVAEConfig

    c = dict(preset.collect)
    agent = AgentConfig(**c.pop("agent", {}))
    return {"collect": dataclasses.asdict(collect.CollectConfig(agent=agent, **c)),
            "vae": dataclasses.asdict(config_from_dict(TrainVAEConfig, dict(preset.vae))),
            "dit": dataclasses.asdict(config_from_dict(TrainDiTConfig, dict(preset.dit))),
            "evaluate": dataclasses.asdict(config_from_dict(evaluate.EvalConfig, dict(preset.evaluate))),
            "other_policy": dataclasses.asdict(other_policy_config(preset)) if preset.other_policy else {}}


def other_policy_config(preset: Preset, **paths: Any) -> Any:
    """The CollectConfig of the preset's other-policy test set (`random` policy unless it names one)."""
    from pipeline import collect

    return config_from_dict(collect.CollectConfig, {"policy": "random", **preset.other_policy, **paths})


REVISION = 2
"""Bumped when a fix changes what runs of unchanged settings train on or how they are scored, so
that runs before and after it do not pool. 2: the collection records with the trained PPO policy
(`workers.rollout.load_recorders`); before, its env runners could keep their initial weights."""


def preset_version(preset: Preset) -> str:
    """A short hash of the resolved settings that decide what a run trains and how its Table 2 is
    scored: runs of one version (any game, any training seed, any machine) pool into one table;
    a changed setting or default makes a new version. Step budgets, not clocks, keep runs on
    different GPUs comparable."""
    settings = resolved_settings(preset)

    def keep(d: dict[str, Any]) -> dict[str, Any]:
        return {k: keep(v) if isinstance(v, dict) else v for k, v in sorted(d.items()) if k not in _UNVERSIONED}

    versioned = {k: keep(v) for k, v in settings.items() if k != "evaluate"}
    versioned["evaluate"] = {k: settings["evaluate"][k] for k in EVAL_VERSIONED}
    if REVISION > 1:  # (revision 1 hashed the settings alone)
        versioned["revision"] = REVISION
    blob = json.dumps(versioned, sort_keys=True, default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


_IMAGINE_UNVERSIONED = {"run_dir", "data_root", "game", "model_path", "name", "seed", "num_env_runners",
                        "cpus_per_env_runner", "gpus_per_env_runner", "learner_gpus", "num_cpus", "use_gpu"}


def imagine_version(preset: Preset) -> str:
    """A short hash of the imagine settings that decide what its agents are and how they are scored
    (not seeds, resources or names): real-game returns of one version pool into imagination.csv."""
    from pipeline import imagine

    cfg = dataclasses.asdict(config_from_dict(imagine.ImagineConfig, dict(preset.imagine)))
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in _IMAGINE_UNVERSIONED}, default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def with_seed(preset: Preset, seed: int) -> Preset:
    """The preset with its training seeds (VAE, DiT) and the evaluation's sampling seed set to
    `seed`. The collection keeps the preset's seed; a run's collection still differs from another's,
    since its PPO agent's training is not bit-reproducible, so a seed's spread includes the data's."""
    return dataclasses.replace(preset, vae={**preset.vae, "seed": seed}, dit={**preset.dit, "seed": seed},
                               evaluate={**preset.evaluate, "seed": seed})
