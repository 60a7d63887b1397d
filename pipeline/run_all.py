"""The whole job: collect -> VAE -> DiT -> evaluate (and on another policy's play: other_policy) ->
imagine -> sweep, on whatever Ray cluster is found.

    ray job submit --working-dir . -- python pipeline/run_all.py --preset smoke --out /abs/runs/smoke
    python -m pipeline.run_all --preset smoke                  # starts a local Ray cluster

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

`--bench generate env` also measures each seed's world model once it is trained (and imagined):
generation frames/s (`benchmarks/bench_generate.py`) and the imagination env's steps/s
(`benchmarks/bench_env.py`), on the resources its evaluation had; tables in `<out>/bench/`, logged
to MLflow under `bench-<game>[-seed<N>]`.
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

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/run_all.py`): run again as `python -m pipeline.run_all`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.run_all", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

from models.config import config_from_dict
from pipeline import cli, collect, evaluate, imagine, sweep
from pipeline import results as results_record
from pipeline.cluster import init_ray, require_lpips_weights
from pipeline.presets import (PRESETS, Preset, imagine_version, other_policy_config, preset_version, resolved_settings,
                              with_overrides, with_seed)
from pipeline.train import train_dit_main, train_vae_main
from workers.rollout import AgentConfig
from workers.train_dit import TrainDiTConfig
from workers.train_vae import TrainVAEConfig

STAGES = ("collect", "vae", "dit", "evaluate", "other_policy", "imagine", "bench", "sweep")
BENCHMARKS = ("generate", "env")
"""What `--bench` can run after each seed: world-model generation speed, imagination env speed."""


# The presets, their `--set` overrides, training seeds and versions (pipeline/presets/); `gpu`,
# `smoke` and `paper` name each preset's factory here too.
gpu, smoke, paper = PRESETS["gpu"], PRESETS["smoke"], PRESETS["paper"]


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def _marker(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _run_stage(out: Path, stage: str, force: set[str], fn: Callable[[], dict[str, Any]],
               settings: Any = None, force_as: str | None = None,
               lacks: Callable[[dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    """Runs `fn` unless the stage completed before (and is not forced: `force` holds stage names,
    `force_as` the name a per-seed stage answers to; nor does its record lack what is asked:
    `lacks(record)` names what it misses); records its outputs and the preset settings it ran with."""
    marker = _marker(out, stage)
    if marker.exists() and (force_as or stage) not in force:
        done = json.loads(marker.read_text())
        missing = lacks(done) if lacks else []
        if not missing:
            print(f"[run_all] {stage}: reusing the completed stage ({marker})", flush=True)
            return done
        print(f"[run_all] {stage}: running again, for {missing}", flush=True)
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


def _require_scoring_weights(out_dir: Path, preset: Preset, stages: tuple[str, ...], force: set[str],
                             seeds: tuple[int | None, ...]) -> None:
    """Stops the job before its first stage when a stage it will run scores LPIPS (an evaluation, a
    sweep's trials) and the weights are missing: that stage would fail only after the collection and
    the training before it (`require_lpips_weights`: here, or on a node where the scoring runs)."""
    def runs(stage: str, marker_name: str) -> bool:
        return stage in stages and (stage in force or not _marker(out_dir, marker_name).exists())

    scoring = [seed_stage(kind, s) for s in seeds for stage, kind in (("evaluate", "evaluate"),
                                                                      ("other_policy", "evaluate-other-policy"))
               if (stage == "evaluate" or preset.other_policy) and runs(stage, seed_stage(kind, s))
               and preset.evaluate.get("lpips", True)]
    if runs("sweep", "sweep") and any(fields.get("eval_lpips", True) for _, fields in preset.sweeps):
        scoring.append("sweep")
    if scoring:
        try:
            require_lpips_weights(bool(preset.evaluate.get("use_gpu", False)))
        except FileNotFoundError as exc:
            raise SystemExit(f"stage(s) {scoring} score LPIPS: {exc}") from exc


def main(preset_name: str, out: str | None = None, force: tuple[str, ...] = (), stages: tuple[str, ...] = STAGES,
         tracking_uri: str | None = None, games: tuple[str, ...] = (),
         sets: tuple[str, ...] = (), seed: int | tuple[int, ...] | None = None,
         bench: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Run the stages of a preset; `games` replaces the preset's games (the DiT trains on the first),
    `sets` replaces single settings (`with_overrides`) and `seed` the training seeds (`with_seed`).
    Several seeds share one collection and one VAE (trained with the first seed, or reused from the
    --out folder whatever its seed): each seed trains and evaluates its own DiT, and its record names
    the VAE's seed. The evaluation's scores and settings are recorded under `<out>/results/<run-id>/`
    (`pipeline/results.py` pools such records into the results tables). `bench` names the
    benchmarks (`BENCHMARKS`) that the bench stage runs on each seed's world model."""
    seeds: tuple[int | None, ...] = (seed,) if seed is None or isinstance(seed, int) else tuple(seed)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seed {list(seeds)}: give distinct training seeds")
    if preset_name not in PRESETS:
        raise SystemExit(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    unknown = (set(force) - {"all"} | set(stages)) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    if set(bench) - set(BENCHMARKS):
        raise SystemExit(f"--bench: unknown {sorted(set(bench) - set(BENCHMARKS))}; choose from {list(BENCHMARKS)}")
    if tuple(stages) == ("bench",) and not bench:
        raise SystemExit(f"--stages bench measures what --bench names: give --bench {' '.join(BENCHMARKS)}")
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
    other_root = str(out_dir / "data_other_policy")  # never read by training
    game = preset.games[0]
    print(f"[run_all] preset={preset_name} version={version} out={out_dir}" + (f" set={list(sets)}" if sets else "")
          + (f" seeds={list(seeds)}" if seeds[0] is not None else ""), flush=True)

    import ray

    if not ray.is_initialized():
        init_ray()  # the cluster of `ray job submit` / RAY_ADDRESS, else a local one
    print(f"[run_all] Ray cluster resources: {ray.cluster_resources()}", flush=True)
    _require_scoring_weights(out_dir, preset, stages, force_set, seeds)

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

    def do_collect_other() -> dict[str, Any]:
        cfg = other_policy_config(preset, data_root=other_root, run_id=f"{preset_name}-other-policy", games=(game,))
        manifest = collect.main(cfg)
        return {"data_root": other_root, "games": {g: {k: v for k, v in m.items() if k != "checkpoint"}
                                                   for g, m in manifest["games"].items()}}

    def do_evaluate(p: Preset, s: int | None, other: bool = False) -> dict[str, Any]:
        """The seed's evaluation on the collection's test split, or (`other`) on the other policy's,
        read with the collection's inverse-dynamics model; each recorded under `<out>/results/`."""
        name = f"eval-{game}" + ("-other-policy" if other else "") + (f"-seed{s}" if s is not None else "")
        cfg = config_from_dict(evaluate.EvalConfig, {**p.evaluate, "run_dir": str(out_dir),
                                                     "data_root": other_root if other else data_root,
                                                     # the other policy's play: scores only (its figures
                                                     # would repeat the collection's evaluation's)
                                                     **({"idm_data_root": data_root, "figure_windows": 0,
                                                         "action_sequences": ()} if other else {}),
                                                     "games": (game,),
                                                     "model_path": results[seed_stage("dit", s)]["model_path"],
                                                     "name": name})
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
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            extra={"eval_dir": str(eval_dir), "test_set": "other_policy" if other else "test",
                   "inputs_digest": sweep.inputs_digest(data_root, results["vae"]["vae_path"])})
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
            if (imag_dir / "heads.csv").is_file():  # the heads' test precision and recall, with the run's scores
                shutil.copy2(imag_dir / "heads.csv", Path(record) / "heads.csv")
            (Path(record) / "imagine.json").write_text(json.dumps(
                {"imagine_version": imagine_version(p), "settings": dataclasses.asdict(cfg)}, indent=1, default=list))
        return {"out_dir": str(imag_dir), "table": tables["imagination"].to_dict(orient="records")}

    def do_bench(p: Preset, s: int | None) -> dict[str, Any]:
        of = f"{game}" + (f"-seed{s}" if s is not None else "")  # the world model's game and seed
        if seed_stage("dit", s) not in results:
            raise RuntimeError(f"no trained DiT to measure: the {seed_stage('dit', s)} stage has not completed "
                               f"in {out_dir} (no {_marker(out_dir, seed_stage('dit', s))})")
        model_path = results[seed_stage("dit", s)]["model_path"]
        gpu = bool(p.evaluate.get("use_gpu", False))
        task = ray.remote(run_benchmark).options(num_cpus=p.evaluate.get("num_cpus", 1), num_gpus=1 if gpu else 0)
        files: dict[str, str] = {}
        import pandas as pd

        from pipeline.tracking import Tracker

        with Tracker(str(out_dir), f"bench-{of}", tracking_uri=tracking_uri, tags={"job": "bench"}) as tracker:
            # tags, not params: a rerun may measure another set, or on other resources, in the same run
            tracker.set_tags({"model_path": model_path, "use_gpu": str(gpu), "benchmarks": ",".join(bench)})
            for b in bench:
                csv = out_dir / "bench" / f"{b}-{of}.csv"
                rows = ray.get(task.remote(b, model_path, data_root, game, str(csv), gpu))
                tracker.log_table(pd.DataFrame(rows), f"bench/{b}.json")
                tracker.log_artifact(csv, "bench")
                files[b] = str(csv)
        return {"files": files}

    def do_sweep() -> dict[str, Any]:
        tables = {}
        # The job's own evaluations may stand for trials that train the preset's DiT (the reference
        # variant of Tables 3 and 4): a sweep does not train a seed's DiT twice.
        records = tuple(r for r in (results.get(seed_stage("evaluate", s), {}).get("record") for s in seeds)
                        if r and Path(r).parent == out_dir / "results" and Path(r, "run.json").is_file()
                        and json.loads(Path(r, "run.json").read_text()).get("preset_version") == version)
        for space, fields in preset.sweeps:
            cfg = dataclasses.replace(sweep.preset_sweep_config(preset, space, fields), run_dir=str(out_dir),
                                      data_root=data_root, vae_path=results["vae"]["vae_path"],
                                      reference_records=records)
            table = sweep.main(cfg, tracking_uri=tracking_uri)
            tables[space] = str(out_dir / "sweeps" / cfg.sweep_name / f"{space}.md")
            print(f"[run_all] sweep {space}: {len(table)} rows", flush=True)
        return {"tables": tables}

    def bench_lacks(done: dict[str, Any]) -> list[str]:
        """The benchmarks asked for that a completed bench stage did not measure."""
        return sorted(set(bench) - set((done.get("settings") or {}).get("bench", ())))

    plan: list[tuple[str, str, Callable[[], dict[str, Any]], Any]] = [
        ("collect", "collect", do_collect, preset.collect), ("vae", "vae", do_vae, preset.vae)]
    if preset.other_policy:
        plan.append(("other_policy", "collect-other-policy", do_collect_other, preset.other_policy))
    for s in seeds:
        p = preset if s is None else with_seed(preset, s)
        plan += [("dit", seed_stage("dit", s), lambda p=p, s=s: do_dit(p, s), p.dit),
                 ("evaluate", seed_stage("evaluate", s), lambda p=p, s=s: do_evaluate(p, s), p.evaluate)]
        if preset.other_policy:
            plan.append(("other_policy", seed_stage("evaluate-other-policy", s),
                         lambda p=p, s=s: do_evaluate(p, s, other=True), p.evaluate))
        plan += [("imagine", seed_stage("imagine", s), lambda p=p, s=s: do_imagine(p, s), p.imagine)]
        if bench:
            plan.append(("bench", seed_stage("bench", s), lambda p=p, s=s: do_bench(p, s), {"bench": list(bench)}))
    plan.append(("sweep", "sweep", do_sweep, preset.sweeps))
    for stage, marker_name, fn, settings in plan:
        if stage not in stages:
            marker = _marker(out_dir, marker_name)
            if marker.exists():
                results[marker_name] = json.loads(marker.read_text())
            continue
        results[marker_name] = _run_stage(out_dir, marker_name, force_set, fn, settings, force_as=stage,
                                          lacks=bench_lacks if stage == "bench" else None)
    print(f"[run_all] finished; outputs under {out_dir}; MLflow store: "
          f"{tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///' + str(out_dir / 'mlflow.db')}",
          flush=True)
    return results


def run_benchmark(name: str, model_path: str, data_root: str, game: str, out: str, gpu: bool) -> list[dict[str, Any]]:
    """One benchmark of `BENCHMARKS` on a trained world model, in the process it is called in (the
    bench stage runs it as a Ray task where the evaluation ran); writes its table to `out` and
    returns the rows. On a GPU batches 1, 64 and 256, on CPU small ones (enough to check the model
    runs); eager generation only: compiling each batch size for CUDA graphs takes minutes
    (`python -m benchmarks.bench_generate --compile eager cudagraphs` measures it)."""
    import benchmarks.bench_env as bench_env
    import benchmarks.bench_generate as bench_generate

    meta = json.loads((Path(model_path) / "world_model.json").read_text())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    batches = (1, 64, 256) if gpu else (1, 4)
    device = "cuda" if gpu else "cpu"
    if name == "generate":
        cfg = bench_generate.BenchGenerateConfig(
            world_model=model_path, batch_sizes=batches, sample_steps=(meta["sample_steps"],),
            compile=("eager",), warmup=2 if gpu else 1,
            iters=10 if gpu else 2, device=device, out=out)
        return bench_generate.main(cfg)
    repeats = tuple(sorted({1, max(meta.get("trained_horizons") or [meta["horizon"]])}))
    heads = ("on", "off") if (Path(model_path) / "heads").is_dir() else ("off",)
    cfg = bench_env.BenchEnvConfig(world_model=model_path, data_root=data_root, game=game, batch_sizes=batches,
                                   action_repeats=repeats, heads=heads, steps=20 if gpu else 2, device=device,
                                   out=out)
    return bench_env.main(cfg)


@dataclass(frozen=True)
class JobArgs:
    """The job's command line."""

    preset: str = dataclasses.field(default="smoke", metadata={"choices": sorted(PRESETS)})
    """Scale of the job: smoke (2 CPU cores, minutes), gpu (one GPU box, about 20 minutes a game),
    paper (a GPU cluster)"""
    out: str | None = None
    """Output folder, absolute under `ray job submit` (unset: <cwd>/runs/<preset>)"""
    force: tuple[str, ...] = ()
    """Stages to redo even if complete (or all)"""
    stages: tuple[str, ...] = STAGES
    """Stages to run; the others are reused when complete, else skipped"""
    games: tuple[str, ...] = ()
    """ALE games to use instead of the preset's (the DiT trains on the first)"""
    tracking_uri: str | None = None
    """MLflow tracking server (unset: MLFLOW_TRACKING_URI, else a sqlite store in --out)"""
    sets: tuple[str, ...] = dataclasses.field(default=(), metadata={"flag": "--set", "metavar": "SECTION.FIELD=VALUE"})
    """Preset settings to replace, e.g. vae.latent_channels=16 dit.max_train_s=600
    collect.agent.train_steps=8000 sweep.seeds=[1] (sections: collect, collect.agent, vae, dit,
    evaluate, other_policy, imagine, sweep: every sweep of the preset; a value is JSON, else a
    string); every --set counts"""
    seed: tuple[int, ...] | None = None
    """Training seed(s) of the DiT (and the evaluation's noise); the VAE takes the first, the
    collection keeps the preset's seed. Several seeds share the collection and the VAE, each
    training, evaluating and recording its own DiT"""
    bench: tuple[str, ...] = dataclasses.field(default=(), metadata={"metavar": "{" + ",".join(BENCHMARKS) + "}"})
    """Benchmarks to run on each seed's world model after its evaluation and imagination
    (generate: frames/s; env: imagined steps/s), where the evaluation ran; tables in <out>/bench/"""


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as given (lists where JobArgs has tuples)."""
    return cli.config_parser(JobArgs, description=__doc__).parse_args(argv)


if __name__ == "__main__":
    a = _parse()
    try:
        main(a.preset, a.out, tuple(a.force), tuple(a.stages), a.tracking_uri, tuple(a.games), tuple(a.sets),
             tuple(a.seed) if a.seed else None, tuple(a.bench))
    except StageFailed as exc:
        print(f"[run_all] ERROR: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
