"""The whole job: collect -> VAE -> DiT -> evaluate -> imagine -> sweep, on whatever Ray cluster is found.

    ray job submit --working-dir . -- python pipeline/run_all.py --preset smoke --out /abs/runs/smoke
    python pipeline/run_all.py --preset smoke                  # starts a local Ray cluster

`ray.init()` joins the cluster that `ray job submit` (or RAY_ADDRESS) points at, or starts a local
one. A preset picks the scale: `smoke` (minutes on 2 CPU cores; what CI runs), `gpu` (one GPU box,
about 20 minutes a game), `paper` (1M steps per game, the large model; a GPU cluster).
`--set section.field=value` replaces single settings of the preset, e.g. `--set
vae.latent_channels=16 dit.max_train_s=600`.

Every stage writes `<out>/stages/<stage>.json` when it completes (its outputs and the settings it
ran with); a rerun reuses completed stages unless `--force` names them (or `all`). A failing stage
stops the job with a message naming it, and the stages before it stay reusable.
`--out` must be absolute under `ray job submit`, whose working directory is a temporary copy; the
default is `<cwd>/runs/<preset>` resolved before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import collect, evaluate, imagine, sweep  # noqa: E402
from pipeline import results as results_record  # noqa: E402
from pipeline.cluster import init_ray  # noqa: E402
from pipeline.train import train_dit_main, train_vae_main  # noqa: E402
from workers.rollout import AgentConfig  # noqa: E402
from models.config import config_from_dict  # noqa: E402
from workers.train_dit import TrainDiTConfig  # noqa: E402
from workers.train_vae import TrainVAEConfig  # noqa: E402

STAGES = ("collect", "vae", "dit", "evaluate", "imagine", "sweep")


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
    """(space, SweepConfig fields) per sweep; SweepConfig.dit defaults to this preset's `dit`."""
    imagine: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ImagineConfig fields (pipeline/imagine.py): PPO trained in the world model, scored in the real game."""


def smoke() -> Preset:
    """Minutes on 2 CPU cores: a one-iteration PPO agent, a few hundred steps, tiny models."""
    cpu = {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False}
    dit = {**cpu, "dit_preset": "tiny", "steps": 30, "batch_size": 4, "warmup_steps": 5,
           "checkpoint_every": 15, "log_every": 5, "horizon": 4, "horizon_choices": (1, 2, 4), "sample_steps": 4}
    return Preset(
        games=("Breakout", "Pong"),
        collect={"policy": "ppo", "steps_per_game": 600, "steps_per_round": 300, "num_env_runners": 2,
                 "cpus_per_env_runner": 0.5, "test_fraction": 0.3, "val_fraction": 0.2,
                 "agent": {"train_steps": 256, "train_batch_size": 256, "minibatch_size": 64, "num_epochs": 1}},
        vae={**cpu, "vae_preset": "tiny", "temporal_kernel": 1, "steps": 30, "batch_size": 2, "clip_length": 8, "warmup_steps": 5,
             "checkpoint_every": 15, "log_every": 5, "val_every": 15, "val_windows": 4},
        dit=dit,
        evaluate={"horizons": (1, 2, 4), "max_windows": 8, "stride": 8, "batch_size": 4, "num_cpus": 0.5,
                  "figure_windows": 1, "idm_steps": 20, "idm_max_pairs": 256},
        imagine={"heads_steps": 40, "heads_max_pairs": 256, "imagination_horizon": 8, "max_contexts": 32,
                 "train_steps": 64, "train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1,
                 "num_env_runners": 1, "num_envs_per_env_runner": 4, "cpus_per_env_runner": 0.5,
                 "eval_episodes": 30, "eval_max_steps": 150, "num_cpus": 0.5},
        sweeps=(("table3", {"seeds": (0,), "overrides": json.dumps({"horizon": [1, 2], "game": "Breakout"}),
                            "dit": json.dumps({**dit, "steps": 12, "checkpoint_every": 12, "horizon_choices": ()}),
                            "eval_max_windows": 4, "eval_lpips": False, "eval_idm_steps": 20,
                            "eval_idm_max_pairs": 256}),),
    )


def gpu() -> Preset:
    """One GPU box (16 cores, one H100 or H200), about 20 minutes a game: the reported runs.

    - Collection: a briefly trained PPO agent records 120k steps; 20 % of the episodes are test
      and 20 % val (split by episode hash), so that intervals over held-out episodes mean something
      (Breakout: 161 val and 140 test episodes; collect warns below 30).
    - Step budgets, not clocks, so that runs on H100 and H200 pool into one table: a frame-wise L2
      VAE (4,000 steps; it exports the EMA weights of its best check on fixed training windows,
      since its loss can spike late), then one DiT for generation lengths 1, 2 and 4 on 64 clips
      a step (2,000 steps), both with a linear learning-rate cooldown over their last 20 %.
    - 4 Euler steps (as good as 8 at half the cost); evaluation at T = 1, 2, 4 on 256 test
      windows spread over the test episodes. `docs/history.md` has the measurements behind each
      choice.
    - The imagine stage trains PPO in each seed's world model and scores it in the real game; the
      sweep stage trains 9 more DiTs (Tables 3 and 4: three variants x three seeds) on the same
      collection and VAE. `--stages collect vae dit evaluate` is Table 2 alone."""
    gpu1 = {"num_workers": 1, "cpus_per_worker": 4, "use_gpu": True, "bf16": True}
    return Preset(
        games=("Breakout",),
        collect={"policy": "ppo", "steps_per_game": 120_000, "steps_per_round": 4000, "num_env_runners": 14,
                 "cpus_per_env_runner": 1.0, "test_fraction": 0.2, "val_fraction": 0.2,
                 "agent": {"train_steps": 64_000, "train_batch_size": 8000, "minibatch_size": 500, "num_epochs": 2,
                           "learner_device": "auto", "learner_threads": 8}},
        vae={**gpu1, "vae_preset": "small", "latent_channels": 8, "temporal_kernel": 1, "recon_kind": "l2",
             "steps": 4_000, "max_train_s": 0.0,
             "batch_size": 16, "clip_length": 4, "lr": 4e-4, "warmup_steps": 200, "lr_cooldown": 0.2, "checkpoint_every": 1000,
             "log_every": 50, "val_every": 500, "val_windows": 32},
        dit={**gpu1, "dit_preset": "S", "patch_size": (1, 4, 4), "steps": 2_000, "max_train_s": 0.0,
             "batch_size": 64, "horizon": 4, "horizon_choices": (1, 2, 4), "sample_steps": 4, "lr": 3e-4,
             "warmup_steps": 300, "lr_cooldown": 0.2, "checkpoint_every": 1000, "log_every": 50},
        evaluate={"horizons": (1, 2, 4), "max_windows": 256, "stride": 8, "batch_size": 32,
                  "num_cpus": 4, "use_gpu": True, "figure_windows": 2},
        # 60k imagined agent steps: about as many as the collection's training split holds; at the
        # measured 87 steps/s (pixel rollout, 256 games) 12 minutes
        imagine={"heads_steps": 2000, "train_steps": 60_000, "train_batch_size": 8192, "minibatch_size": 512,
                 "num_epochs": 2, "num_env_runners": 1, "num_envs_per_env_runner": 256, "cpus_per_env_runner": 2,
                 "gpus_per_env_runner": 0.5, "learner_gpus": 0.5, "eval_episodes": 30, "num_cpus": 4,
                 "use_gpu": True},
        # Tables 3 and 4: the preset's DiT with only action_mode or action_encoder changed, 3 seeds, on
        # the job's collection and VAE, one trial at a time; scored on test (records pooled by
        # `python -m pipeline.results ablations`); set sweep eval_split "val" while choosing settings.
        sweeps=(("ablations", {"seeds": (0, 1, 2), "use_gpu": True, "eval_split": "test", "eval_max_windows": 256,
                               "eval_stride": 8, "eval_batch_size": 32, "eval_num_cpus": 4, "eval_lpips": True,
                               "eval_idm_steps": 2000, "eval_idm_max_pairs": 8192, "max_concurrent_trials": 1,
                               "trials_per_gpu": 1}),),
    )


def paper() -> Preset:
    """The paper's scale: 1M recorded steps per game, a large ST-DiT; a GPU cluster."""
    gpus = {"num_workers": 8, "cpus_per_worker": 8, "use_gpu": True, "bf16": True}
    return Preset(
        games=("Breakout", "Pong", "DemonAttack"),
        collect={"policy": "ppo", "steps_per_game": 1_000_000, "num_env_runners": 32, "cpus_per_env_runner": 1.0,
                 "agent": {"train_steps": 10_000_000}},
        vae={**gpus, "vae_preset": "base", "latent_channels": 8, "steps": 100_000, "batch_size": 8,
             "clip_length": 16},
        dit={**gpus, "dit_preset": "B", "steps": 200_000, "batch_size": 32, "horizon": 4, "sample_steps": 16},
        evaluate={"horizons": (1, 2, 4, 8, 16), "max_windows": 2048, "use_gpu": True, "num_cpus": 4},
        sweeps=tuple((space, {"seeds": (0, 1, 2), "use_gpu": True, **({"games": ("Breakout",)} if space != "table2" else {})})
                     for space in ("table2", "table3", "table4")),  # the paper's Tables 3 and 4 are Breakout only
    )


PRESETS: dict[str, Callable[[], Preset]] = {"smoke": smoke, "gpu": gpu, "paper": paper}


def _section_configs() -> dict[str, type]:
    return {"collect": collect.CollectConfig, "collect.agent": AgentConfig, "vae": TrainVAEConfig,
            "dit": TrainDiTConfig, "evaluate": evaluate.EvalConfig, "imagine": imagine.ImagineConfig}


def with_overrides(preset: Preset, sets: tuple[str, ...]) -> Preset:
    """The preset with `section.field=value` settings replaced (`--set`): section is collect,
    collect.agent, vae, dit or evaluate; value is JSON (`16`, `[1, 2]`, `true`), else a string.
    An unknown section or field fails here, naming it, before anything runs."""
    sections = _section_configs()
    parts = {name: dict(getattr(preset, name)) for name in ("collect", "vae", "dit", "evaluate", "imagine")}
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
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if section == "collect.agent":  # a copy: the preset's own dict stays as it was
            parts["collect"]["agent"] = {**parts["collect"].get("agent", {}), field: value}
        else:
            parts[section][field] = value
    return dataclasses.replace(preset, **parts)


# Fields that do not change what a run trains or how its Table 2 is scored: where it runs, with
# what resources, under which names, and the training seeds (seeds of one version pool).
_UNVERSIONED = {"run_dir", "data_root", "name", "game", "games", "run_id", "vae_path", "model_path", "seed",
                "num_workers", "cpus_per_worker", "use_gpu", "num_cpus", "figure_windows",
                "action_sequences", "windows_of", "checkpoint_every", "log_every", "num_env_runners",
                "cpus_per_env_runner", "gpus_per_env_runner", "learner_threads", "learner_device",
                "steps_per_round", "data_loader"}
_EVAL_VERSIONED = ("split", "horizons", "stride", "max_windows", "sample_steps", "guidance_scale", "lpips",
                   "vae_recon", "action_tests", "idm_steps", "idm_max_pairs")


def resolved_settings(preset: Preset) -> dict[str, dict[str, Any]]:
    """Every setting of the preset's configs, defaults included (what a run actually trains with)."""
    c = dict(preset.collect)
    agent = AgentConfig(**c.pop("agent", {}))
    return {"collect": dataclasses.asdict(collect.CollectConfig(agent=agent, **c)),
            "vae": dataclasses.asdict(config_from_dict(TrainVAEConfig, dict(preset.vae))),
            "dit": dataclasses.asdict(config_from_dict(TrainDiTConfig, dict(preset.dit))),
            "evaluate": dataclasses.asdict(config_from_dict(evaluate.EvalConfig, dict(preset.evaluate)))}


def preset_version(preset: Preset) -> str:
    """A short hash of the resolved settings that decide what a run trains and how its Table 2 is
    scored: runs of one version (any game, any training seed, any machine) pool into one table;
    a changed setting or default makes a new version. Step budgets, not clocks, keep runs on
    different GPUs comparable."""
    settings = resolved_settings(preset)

    def keep(d: dict[str, Any]) -> dict[str, Any]:
        return {k: keep(v) if isinstance(v, dict) else v for k, v in sorted(d.items()) if k not in _UNVERSIONED}

    versioned = {k: keep(v) for k, v in settings.items() if k != "evaluate"}
    versioned["evaluate"] = {k: settings["evaluate"][k] for k in _EVAL_VERSIONED}
    blob = json.dumps(versioned, sort_keys=True, default=list)
    import hashlib

    return hashlib.sha1(blob.encode()).hexdigest()[:10]


_IMAGINE_UNVERSIONED = {"run_dir", "data_root", "game", "model_path", "name", "seed", "num_env_runners",
                        "cpus_per_env_runner", "gpus_per_env_runner", "learner_gpus", "num_cpus", "use_gpu"}


def imagine_version(preset: Preset) -> str:
    """A short hash of the imagine settings that decide what its agents are and how they are scored
    (not seeds, resources or names): real-game returns of one version pool into imagination.csv."""
    import hashlib

    cfg = dataclasses.asdict(config_from_dict(imagine.ImagineConfig, dict(preset.imagine)))
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in _IMAGINE_UNVERSIONED}, default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def with_seed(preset: Preset, seed: int) -> Preset:
    """The preset with its training seeds (VAE, DiT) and the evaluation's sampling seed set to
    `seed`. The collection keeps the preset's seed; a run's collection still differs from another's,
    since its PPO agent's training is not bit-reproducible, so a seed's spread includes the data's."""
    return dataclasses.replace(preset, vae={**preset.vae, "seed": seed}, dit={**preset.dit, "seed": seed},
                               evaluate={**preset.evaluate, "seed": seed})


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def _marker(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _run_stage(out: Path, stage: str, force: set[str], fn: Callable[[], dict[str, Any]],
               settings: Any = None, force_as: str | None = None) -> dict[str, Any]:
    """Runs `fn` unless the stage completed before (and is not forced: `force` holds stage names,
    `force_as` the name a per-seed stage answers to); records its outputs and the preset settings
    it ran with."""
    marker = _marker(out, stage)
    if marker.exists() and (force_as or stage) not in force:
        done = json.loads(marker.read_text())
        print(f"[run_all] {stage}: reusing the completed stage ({marker})", flush=True)
        return done
    print(f"[run_all] {stage}: starting", flush=True)
    t0 = time.time()
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised with the stage named
        traceback.print_exc()
        raise StageFailed(stage, exc) from exc
    result = {**result, "wall_s": round(time.time() - t0, 1), "settings": settings}
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, marker)  # a stage counts as done only once its marker is whole
    print(f"[run_all] {stage}: done in {result['wall_s']} s", flush=True)
    return result


def seed_stage(stage: str, seed: int | None) -> str:
    """The marker name of a per-seed stage (dit, evaluate): `dit` without `--seed`, `dit-seed1` with
    it, so that a later seed in the same --out trains its own DiT instead of reusing another's."""
    return stage if seed is None else f"{stage}-seed{seed}"


def main(preset_name: str, out: str | None = None, force: tuple[str, ...] = (), stages: tuple[str, ...] = STAGES,
         tracking_uri: str | None = None, games: tuple[str, ...] = (),
         sets: tuple[str, ...] = (), seed: int | tuple[int, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Run the stages of a preset; `games` replaces the preset's games (the DiT trains on the first),
    `sets` replaces single settings (`with_overrides`) and `seed` the training seeds (`with_seed`).
    Several seeds share one collection and one VAE (trained with the first seed, or reused from the
    --out folder whatever its seed): each seed trains and evaluates its own DiT, and its record names
    the VAE's seed. The evaluation's scores and settings are recorded under `<out>/results/<run-id>/`
    (`pipeline/results.py` pools such records into the results tables)."""
    seeds: tuple[int | None, ...] = (seed,) if seed is None or isinstance(seed, int) else tuple(seed)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seed {list(seeds)}: give distinct training seeds")
    if preset_name not in PRESETS:
        raise SystemExit(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    unknown = (set(force) - {"all"} | set(stages)) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    preset = with_overrides(PRESETS[preset_name](), sets)
    if seeds[0] is not None:
        preset = with_seed(preset, seeds[0])  # the VAE's seed; each DiT gets its own below
    version = preset_version(preset)
    if games:
        from workers.atari import game_name, resolve_env_id

        preset = dataclasses.replace(preset, games=tuple(game_name(resolve_env_id(g)) for g in games))
    out_dir = Path(out or Path.cwd() / "runs" / preset_name).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    force_set = set(STAGES) if "all" in force else set(force)
    data_root = str(out_dir / "data")
    game = preset.games[0]
    print(f"[run_all] preset={preset_name} version={version} out={out_dir}" + (f" set={list(sets)}" if sets else "")
          + (f" seeds={list(seeds)}" if seeds[0] is not None else ""), flush=True)

    import ray

    if not ray.is_initialized():
        init_ray()  # the cluster of `ray job submit` / RAY_ADDRESS, else a local one
    print(f"[run_all] Ray cluster resources: {ray.cluster_resources()}", flush=True)

    def do_collect() -> dict[str, Any]:
        c = dict(preset.collect)
        agent = AgentConfig(**c.pop("agent", {}))
        cfg = collect.CollectConfig(data_root=data_root, run_id=preset_name, games=preset.games, agent=agent, **c)
        manifest = collect.main(cfg)
        return {"data_root": data_root, "games": {g: {k: v for k, v in m.items() if k != "checkpoint"}
                                                  for g, m in manifest["games"].items()}}

    def do_vae() -> dict[str, Any]:
        cfg = config_from_dict(TrainVAEConfig, {**preset.vae, "run_dir": str(out_dir), "data_root": data_root,
                                                "game": "", "name": "vae"})
        return {"vae_path": str(train_vae_main(cfg, tracking_uri=tracking_uri))}

    results: dict[str, dict[str, Any]] = {}

    def do_dit(p: Preset, s: int | None) -> dict[str, Any]:
        cfg = config_from_dict(TrainDiTConfig, {**p.dit, "run_dir": str(out_dir), "data_root": data_root,
                                                "game": game, "name": f"dit-{game}" + (f"-seed{s}" if s is not None else ""),
                                                "vae_path": results["vae"]["vae_path"]})
        return {"model_path": str(train_dit_main(cfg, tracking_uri=tracking_uri))}

    def do_evaluate(p: Preset, s: int | None) -> dict[str, Any]:
        cfg = config_from_dict(evaluate.EvalConfig, {**p.evaluate, "run_dir": str(out_dir),
                                                     "data_root": data_root, "games": (game,),
                                                     "model_path": results[seed_stage("dit", s)]["model_path"],
                                                     "name": f"eval-{game}" + (f"-seed{s}" if s is not None else "")})
        tables = evaluate.main(cfg, tracking_uri=tracking_uri)
        df = tables["generation_length"]
        print(df.to_string(index=False), flush=True)
        eval_dir = out_dir / "eval" / cfg.name
        settings = resolved_settings(p)
        vae_settings = results["vae"].get("settings") or {}
        settings["vae"]["seed"] = int(vae_settings.get("seed", settings["vae"]["seed"]))  # the VAE that served
        walls = {k: v.get("wall_s") for k, v in results.items() if isinstance(v, dict)}
        walls = {"collect": walls.get("collect"), "vae": walls.get("vae"), "dit": walls.get(seed_stage("dit", s))}
        record = results_record.record_run(
            out_dir / "results", eval_dir / f"{game}_scores.npz", preset=preset_name, version=version, game=game,
            seed=int(p.dit.get("seed", 0)), split=cfg.split, settings=settings, stage_walls=walls,
            command=" ".join([os.path.basename(sys.executable), *sys.argv]))
        print(f"[run_all] evaluation recorded in {record}", flush=True)
        return {"eval_dir": str(eval_dir), "record": str(record), "table": df.to_dict(orient="records")}

    def do_imagine(p: Preset, s: int | None) -> dict[str, Any]:
        cfg = config_from_dict(imagine.ImagineConfig, {**p.imagine, "run_dir": str(out_dir), "data_root": data_root,
                                                       "game": game, "seed": 0 if s is None else s,
                                                       "model_path": results[seed_stage("dit", s)]["model_path"],
                                                       "name": f"imagine-{game}" + (f"-seed{s}" if s is not None else "")})
        tables = imagine.main(cfg, tracking_uri=tracking_uri)
        imag_dir = out_dir / "imagine" / cfg.name
        record = results.get(seed_stage("evaluate", s), {}).get("record")
        if record and Path(record).is_dir():  # the seed's record carries its real-game returns (results tables)
            import shutil

            shutil.copy2(imag_dir / "returns.npz", Path(record) / results_record.IMAGINATION_FILE)
            shutil.copy2(imag_dir / "imagination.csv", Path(record) / "imagination.csv")
            (Path(record) / "imagine.json").write_text(json.dumps(
                {"imagine_version": imagine_version(p), "settings": dataclasses.asdict(cfg)}, indent=1, default=list))
        return {"out_dir": str(imag_dir), "table": tables["imagination"].to_dict(orient="records")}

    def do_sweep() -> dict[str, Any]:
        tables = {}
        for space, fields in preset.sweeps:
            fields = {"dit": json.dumps(preset.dit), **fields}
            cfg = config_from_dict(sweep.SweepConfig, {**fields, "space": space, "run_dir": str(out_dir),
                                                       "data_root": data_root,
                                                       "vae_path": results["vae"]["vae_path"]})
            table = sweep.main(cfg, tracking_uri=tracking_uri)
            tables[space] = str(out_dir / "sweeps" / cfg.sweep_name / f"{space}.md")
            print(f"[run_all] sweep {space}: {len(table)} rows", flush=True)
        return {"tables": tables}

    plan: list[tuple[str, str, Callable[[], dict[str, Any]], Any]] = [
        ("collect", "collect", do_collect, preset.collect), ("vae", "vae", do_vae, preset.vae)]
    for s in seeds:
        p = preset if s is None else with_seed(preset, s)
        plan += [("dit", seed_stage("dit", s), lambda p=p, s=s: do_dit(p, s), p.dit),
                 ("evaluate", seed_stage("evaluate", s), lambda p=p, s=s: do_evaluate(p, s), p.evaluate),
                 ("imagine", seed_stage("imagine", s), lambda p=p, s=s: do_imagine(p, s), p.imagine)]
    plan.append(("sweep", "sweep", do_sweep, preset.sweeps))
    for stage, marker_name, fn, settings in plan:
        if stage not in stages:
            marker = _marker(out_dir, marker_name)
            if marker.exists():
                results[marker_name] = json.loads(marker.read_text())
            continue
        results[marker_name] = _run_stage(out_dir, marker_name, force_set, fn, settings, force_as=stage)
    print(f"[run_all] finished; outputs under {out_dir}; MLflow store: "
          f"{tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///' + str(out_dir / 'mlflow.db')}",
          flush=True)
    return results


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    p.add_argument("--out", default=None, help="absolute output directory (default <cwd>/runs/<preset>)")
    p.add_argument("--force", nargs="*", default=[], help=f"stages to redo even if complete: {STAGES} or all")
    p.add_argument("--stages", nargs="*", default=list(STAGES), help="stages to run (others are reused or skipped)")
    p.add_argument("--games", nargs="*", default=[], help="ALE games to use instead of the preset's "
                                                          "(the DiT trains on the first)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI, "
                                                        "else a sqlite store in --out)")
    p.add_argument("--set", nargs="*", action="extend", default=[], dest="sets", metavar="SECTION.FIELD=VALUE",
                   help="replace preset settings (repeatable: every --set counts), e.g. "
                        "vae.latent_channels=16 dit.max_train_s=600 "
                        "collect.agent.train_steps=8000 (sections: collect, collect.agent, vae, dit, evaluate, imagine)")
    p.add_argument("--seed", type=int, nargs="+", default=None,
                   help="training seed(s) of the DiT (and the evaluation's noise); the VAE takes the first, "
                        "the collection keeps the preset's seed. Several seeds share the collection and the "
                        "VAE, each training, evaluating and recording its own DiT")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = _parse()
    try:
        main(a.preset, a.out, tuple(a.force), tuple(a.stages), a.tracking_uri, tuple(a.games), tuple(a.sets),
             tuple(a.seed) if a.seed else None)
    except StageFailed as exc:
        print(f"[run_all] ERROR: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
