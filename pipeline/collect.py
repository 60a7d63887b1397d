"""Stage 1: play Atari with a PPO agent (or at random) and record the raw games as Parquet.

    python -m pipeline.collect --data-root /abs/data --run-id r0 --games Breakout Pong \\
        --steps-per-game 1000000 --num-env-runners 8 --agent-train-steps 2000000

Per game: train PPO (RLlib new API stack) or load `--checkpoint`, then record with the
algorithm's env runners (each steps `--num-envs-per-env-runner` envs with one batched policy
forward pass) and have every runner write its rows as Parquet itself to

    <data_root>/episodes/game=<Game>/run=<run_id>/*.parquet     (zstd, schema: workers/schema.py)
    <data_root>/runs/<run_id>.json                              (manifest: counts, policy, versions)
    <data_root>/checkpoints/<run_id>/<Game>/                    (trained RLlib checkpoint)

Writes go to <data_root>/.staging first and each game's run directory is swapped in by rename, so
a reader never sees half a run and re-running a run id replaces its data instead of adding to it.
On a multi-node cluster <data_root> must be shared storage: runners on every node write into it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/collect.py`): run again as `python -m pipeline.collect`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.collect", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import cli
from pipeline.cluster import init_ray
from workers import schema as S
from workers.atari import DEFAULT_GAMES, EnvSettings, game_name, resolve_env_id
from workers.rollout import AgentConfig, build_recorder_algo, train_ppo, write_on_runner


@dataclass(frozen=True)
class CollectConfig:
    """One collection run."""

    data_root: str = "data"
    """dataset root (absolute under `ray job submit`: its working dir is a temporary copy)"""
    run_id: str = "run0"
    """name of this run; re-running the same id replaces its data"""
    games: tuple[str, ...] = DEFAULT_GAMES
    """ALE v5 games ('Pong' or 'ALE/Pong-v5'); unknown names fail before anything starts"""
    policy: str = "ppo"
    """'ppo' (train, or load `checkpoint`) or 'random' (uniform actions; tests, baselines, and a
    second policy to test a world model on)"""
    random_repeat: float = 0.0
    """with the random policy: probability that each step repeats the policy's previous action (a
    policy that holds its choices for a while, unlike the collecting agent; the emulator's own
    sticky actions would make the recorded action differ from the executed one)"""
    checkpoint: str | None = None
    """existing RLlib checkpoint to record with instead of training; '{game}' is substituted"""
    steps_per_game: int = 1_000_000
    """recorded env steps (rows) per game"""
    steps_per_round: int = 2000
    """steps each env runner samples between writes (bounds memory, sets file size)"""
    num_env_runners: int = 2
    cpus_per_env_runner: float = 1.0
    num_envs_per_env_runner: int = 8
    """envs each runner steps together: the policy runs once per step on all of them"""
    gpus_per_env_runner: float = 0.0
    """GPU share of each recording runner (e.g. 1/14 for 14 runners on one GPU): the policy's
    forward pass then runs on the GPU and the runner's CPU only steps the envs"""
    explore: bool = True
    """sample actions from the policy (True) or take its mode"""
    epsilon: float = 0.0
    """with the PPO policy: probability that each step's action is a uniform one instead of the
    policy's (epsilon-greedy), widening the actions the collection covers"""
    test_fraction: float = 0.1
    """share of episodes in the test split (hash of the episode id), read only by a run's final
    evaluation"""
    val_fraction: float = 0.1
    """share of episodes in the val split (the same hash, next to test's range), read by everything
    that selects: the VAE's held-out check, evaluations during development, lever choices"""
    seed: int = 0
    frameskip: int = 4
    repeat_action_probability: float = 0.0
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self):
        if self.policy not in ("ppo", "random"):
            raise ValueError(f"policy must be 'ppo' or 'random', got {self.policy!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.random_repeat < 1.0:
            raise ValueError(f"random_repeat must be in [0, 1), got {self.random_repeat}")
        if self.num_env_runners < 1:
            raise ValueError(f"num_env_runners must be >= 1, got {self.num_env_runners}")
        if self.num_envs_per_env_runner < 1:
            raise ValueError(f"num_envs_per_env_runner must be >= 1, got "
                             f"{self.num_envs_per_env_runner}")
        if self.gpus_per_env_runner < 0:
            raise ValueError(f"gpus_per_env_runner must be >= 0, got {self.gpus_per_env_runner}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1], got {self.test_fraction}")
        if not (0.0 <= self.val_fraction and self.val_fraction + self.test_fraction <= 1.0 + 1e-9):
            raise ValueError(f"val_fraction must be in [0, 1 - test_fraction = {1 - self.test_fraction:g}], "
                             f"got {self.val_fraction}")


MIN_HELDOUT_EPISODES = 30
"""Episodes a val or test split should hold for a bootstrap over episodes to mean something."""


def _write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _record_game(cfg: CollectConfig, env_id: str, checkpoint: str | None,
                 out_dir: str) -> tuple[float, dict, float | None, list[str]]:
    """Record `steps_per_game` rows of one game into `out_dir` (one Parquet file per runner and
    round); returns the seconds spent sampling, compressing and writing (start-up excluded), the
    runners' seconds per phase (policy, env, drain, write) summed over runners, the steady rate
    (rounds after the first), and the dtypes the runners' policies ran in."""
    import ray

    # Runners write their own files, so no CPU has to stay free for write tasks; on a small
    # cluster they share what there is (a fraction of a CPU still runs at full speed when the
    # cores are idle).
    total = ray.cluster_resources().get("CPU", 1.0)
    cpus = min(cfg.cpus_per_env_runner, total / cfg.num_env_runners)
    if cpus < cfg.cpus_per_env_runner:
        print(f"[collect] {cfg.num_env_runners} env runners x {cfg.cpus_per_env_runner} CPU exceed "
              f"{total:g} CPUs: using {cpus:.2f} CPU each", flush=True)
    settings = EnvSettings(frameskip=cfg.frameskip,
                           repeat_action_probability=cfg.repeat_action_probability)
    algo = build_recorder_algo(env_id, cfg.agent, settings, num_env_runners=cfg.num_env_runners,
                               cpus_per_env_runner=cpus, run_id=cfg.run_id,
                               seed=cfg.seed, test_fraction=cfg.test_fraction,
                               val_fraction=cfg.val_fraction,
                               checkpoint=checkpoint,
                               num_envs_per_env_runner=cfg.num_envs_per_env_runner,
                               gpus_per_env_runner=cfg.gpus_per_env_runner if cfg.policy == "ppo" else 0.0)
    group = algo.env_runner_group
    game = game_name(env_id)
    t0, steps, episodes, returns = time.time(), 0, 0, []
    first_round = None  # (time, steps) after round 1: the steady rate leaves out env start-up
    try:
        final = False
        while not final:
            remaining = cfg.steps_per_game - steps
            per_runner = min(cfg.steps_per_round, -(-remaining // cfg.num_env_runners))
            final = remaining <= per_runner * cfg.num_env_runners
            fn = functools.partial(write_on_runner, out_dir=out_dir, num_timesteps=per_runner,
                                   explore=cfg.explore, random_actions=cfg.policy == "random",
                                   final=final, repeat=cfg.random_repeat if cfg.policy == "random" else 0.0,
                                   epsilon=cfg.epsilon if cfg.policy == "ppo" else 0.0)
            stats = group.foreach_env_runner(fn, local_env_runner=False)
            if len(stats) != cfg.num_env_runners:  # RLlib drops a failed runner's result
                raise RuntimeError(f"{game}: {cfg.num_env_runners - len(stats)} env runner(s) "
                                   f"failed while recording; see the Ray worker logs")
            steps = sum(s["steps"] for s in stats)
            new = [x for s in stats for x in s["returns"]]
            episodes += len(new)
            returns += new
            recent = returns[-20:]
            mean = sum(recent) / len(recent) if recent else float("nan")
            phases = {k: sum(s["seconds"][k] for s in stats) for k in stats[0]["seconds"]}
            first_round = first_round or (time.time(), steps)
            print(f"[collect {game}] steps={steps}/{cfg.steps_per_game} "
                  f"steps/s={steps / (time.time() - t0):.0f} episodes={episodes} "
                  f"return_mean(last {len(recent)})={mean:.1f} runner seconds: "
                  + " ".join(f"{k}={v:.1f}" for k, v in phases.items()), flush=True)
        end = time.time()
        steady = (steps - first_round[1]) / (end - first_round[0]) if steps > first_round[1] else None
        return end - t0, phases, steady, sorted({s["policy_dtype"] for s in stats})
    finally:
        algo.stop()


def _summarise(run_dir: str) -> dict:
    """Counts of a written run directory, read from the scalar columns only."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(run_dir) for f in fs
                   if f.endswith(".parquet"))
    # File by file: the `game` column is in the files and in the hive path, and the two disagree
    # on type when a dataset reader merges them.
    t = pa.concat_tables([pq.ParquetFile(f).read(columns=[S.EPISODE_ID, S.SPLIT, S.TERMINATED])
                          for f in files])
    eids, splits = t[S.EPISODE_ID].to_numpy(), t[S.SPLIT].to_numpy()
    per_split = {s: len(set(eids[splits == s])) for s in S.SPLITS}
    nbytes = sum(os.path.getsize(f) for f in files)
    return dict(rows=t.num_rows, episodes=len(set(eids)), episodes_per_split=per_split,
                games_over=int(t[S.TERMINATED].to_numpy().sum()), files=len(files),
                bytes=nbytes, bytes_per_frame=nbytes / max(t.num_rows, 1))


def _versions() -> dict:
    import ale_py
    import gymnasium
    import pyarrow
    import ray
    import torch

    return dict(python=platform.python_version(), ray=ray.__version__, ale_py=ale_py.__version__,
                gymnasium=gymnasium.__version__, pyarrow=pyarrow.__version__,
                torch=torch.__version__)


def main(cfg: CollectConfig) -> dict:
    """Run the collection; returns the manifest (also written to <data_root>/runs/<run_id>.json)."""
    import ray

    env_ids = [resolve_env_id(g) for g in cfg.games]  # fail before any cluster starts
    root = os.path.abspath(cfg.data_root)
    if not ray.is_initialized():
        init_ray(include_dashboard=False)
    staging = os.path.join(root, ".staging", f"{cfg.run_id}-{uuid.uuid4().hex[:8]}")
    manifest = dict(run_id=cfg.run_id, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    config=asdict(cfg), versions=_versions(), schema=list(S.COLUMNS),
                    compression=f"{S.COMPRESSION}:{S.COMPRESSION_LEVEL}", games={})
    try:
        for env_id in env_ids:
            game = game_name(env_id)
            checkpoint = None
            if cfg.policy == "ppo":
                if cfg.checkpoint is not None:
                    checkpoint = os.path.abspath(cfg.checkpoint.format(game=game))
                    if not os.path.isdir(checkpoint):
                        raise FileNotFoundError(f"checkpoint for {game} not found: {checkpoint}")
                else:
                    checkpoint = train_ppo(
                        env_id, cfg.agent, os.path.join(root, "checkpoints", cfg.run_id, game),
                        num_env_runners=cfg.num_env_runners,
                        cpus_per_env_runner=cfg.cpus_per_env_runner)
            out_dir = os.path.join(staging, f"game={game}", f"run={cfg.run_id}")
            seconds, phases, steady, dtypes = _record_game(cfg, env_id, checkpoint, out_dir)
            summary = _summarise(out_dir)
            # steps_per_s: every recorded row over the whole recording, first resets included
            # (each sub-env's seeded reset reloads the ROM, ~0.1 s); steady_steps_per_s: the
            # rounds after the first (None with a single round).
            manifest["games"][game] = dict(env_id=env_id, policy=cfg.policy, checkpoint=checkpoint,
                                           record_seconds=seconds, runner_seconds=phases, policy_dtype=dtypes,
                                           steps_per_s=summary["rows"] / seconds,
                                           steady_steps_per_s=steady, **summary)
        # Swap every game's run directory in by rename (atomic per game on one filesystem).
        for game in manifest["games"]:
            final = os.path.join(root, "episodes", f"game={game}", f"run={cfg.run_id}")
            os.makedirs(os.path.dirname(final), exist_ok=True)
            trash = f"{staging}-old-{game}"
            if os.path.exists(final):
                os.rename(final, trash)
            os.rename(os.path.join(staging, f"game={game}", f"run={cfg.run_id}"), final)
            shutil.rmtree(trash, ignore_errors=True)
        _write_json_atomic(os.path.join(root, "runs", f"{cfg.run_id}.json"), manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for game, m in manifest["games"].items():
        print(f"[collect {game}] wrote {m['rows']} rows, {m['episodes']} episodes "
              f"({m['episodes_per_split']}), {m['bytes_per_frame']:.0f} B/frame", flush=True)
        few = {s: n for s, n in m["episodes_per_split"].items()
               if s != "train" and n < MIN_HELDOUT_EPISODES and getattr(cfg, f"{s}_fraction") > 0}
        if few:
            print(f"[collect {game}] WARNING: {few} held-out episodes: intervals over fewer than "
                  f"{MIN_HELDOUT_EPISODES} episodes are rough; collect more steps or raise the fractions", flush=True)
    return manifest


def _parse(argv: list[str] | None = None) -> CollectConfig:
    return cli.parse_config(CollectConfig, argv, description=__doc__)


if __name__ == "__main__":
    main(_parse())
