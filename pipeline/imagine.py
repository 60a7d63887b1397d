"""The imagine stage: an agent trained only inside the world model, scored in the real game.

    python -m pipeline.imagine --run-dir /abs/run --data-root /abs/run/data --game Breakout \\
        --model-path /abs/run/models/dit-Breakout --train-steps 200000

1. Reward/termination heads (`workers/reward_model.py`) are trained on the training split's frame
   pairs, their thresholds chosen on val, and saved in the world-model folder (`heads/`); their
   precision and recall on the test split go to `heads.csv`. A folder that has heads keeps them.
2. RLlib PPO trains in imagination only: its env runners hold `WorldModelVectorEnv` (many imagined
   games per world-model call, on the runner's GPU share when there is one), started from real
   training-split contexts. Each iteration's imagined return and the share of time spent
   generating go to MLflow (the learning curve, `learning_curve.csv`); the agent's checkpoint is
   saved under `<run_dir>/agents/<name>/`.
3. The real game (ALE, sticky actions as ALE v5 plays by default) scores it over `eval_episodes`
   full games, beside a uniform-random agent and the PPO agent that collected the data (when the
   collection trained one). A game runs to game over through the agent's usual wrappers (lost lives
   continue the game) or stops at `eval_max_steps` agent steps, counted as truncated. Actions are
   sampled from the policy. `imagination.csv`: mean return per agent with a 95 % bootstrap interval
   over games; `returns.npz` the per-game returns, lengths and truncation flags.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/imagine.py`): run again as `python -m pipeline.imagine`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.imagine", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np
import pandas as pd

from pipeline import cli
from pipeline.cluster import ensure_ray
from pipeline.stats import stratified_mean_resamples
from pipeline.tracking import Tracker

AGENTS = ("imagination", "random", "ppo_real")
IMAGINATION_COLUMNS = ["game", "agent", "return_mean", "return_ci_low", "return_ci_high", "episodes", "truncated",
                       "seeds", "return_std", "length_mean", "max_steps"]


@dataclass(frozen=True)
class ImagineConfig:
    """One imagination run: heads, PPO in the world model, real-game scores."""

    run_dir: str = "runs/imagine"
    """Run folder (MLflow store, agents/, imagine/<name>/ tables)."""
    data_root: str = ""
    """The collection the world model was trained on: contexts, heads' pairs, the collecting agent."""
    game: str = ""
    """Game of the world model, e.g. "Breakout"."""
    model_path: str = ""
    """World-model folder; its heads are trained into `heads/` when missing."""
    name: str = ""
    """MLflow run and folder name; default imagine-<game>."""
    seed: int = 0
    """Seeds the heads, PPO, the imagined games and the real games' resets."""
    heads_steps: int = 2000
    """Optimiser steps of the reward/termination heads."""
    heads_max_pairs: int = 8192
    """Training pairs of the heads (a seeded subset of the training split)."""
    action_repeat: int = 1
    """Frames generated per agent step in one chunk (1 = frame by frame; a trained generation length)."""
    imagination_horizon: int = 500
    """Agent steps after which an imagined episode is truncated."""
    max_contexts: int = 256
    """Starting contexts each env runner holds."""
    sample_steps: int = 0
    """Euler steps of generation; 0 = the world model's own."""
    train_steps: int = 200_000
    """Imagined agent steps of PPO training."""
    train_batch_size: int = 4096
    """PPO train batch (imagined agent steps per iteration)."""
    minibatch_size: int = 256
    num_epochs: int = 4
    lr: float = 2.5e-4
    num_env_runners: int = 1
    """EnvRunners, each holding one batched imagination env."""
    num_envs_per_env_runner: int = 64
    """Imagined games per runner, generated in one world-model call per step."""
    cpus_per_env_runner: float = 1.0
    gpus_per_env_runner: float = 0.0
    """GPU share of each runner (its world model's device); 0 = CPU."""
    learner_gpus: float = 0.0
    """GPU share of PPO's learner (0 = CPU; a fraction shares one GPU with the runners)."""
    eval_episodes: int = 30
    """Real games per agent."""
    eval_max_steps: int = 27_000
    """Recorded steps (frame skip 4) after which a real game is cut (27,000 = ALE's 108,000 frames);
    an agent that acts every `action_repeat` steps gets that many times fewer decisions."""
    eval_repeat_action_probability: float = 0.25
    """Sticky actions of the real games (ALE v5 default)."""
    agents: tuple[str, ...] = AGENTS
    """Agents scored in the real game (imagination, random, ppo_real)."""
    num_cpus: float = 1.0
    """CPUs of the heads and real-game tasks."""
    use_gpu: bool = False
    """Train the heads on a GPU."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "agents", tuple(self.agents))
        unknown = set(self.agents) - set(AGENTS)
        if unknown:
            raise ValueError(f"ImagineConfig.agents: unknown {sorted(unknown)}; agents are {AGENTS}")
        for name in ("train_steps", "train_batch_size", "eval_episodes", "eval_max_steps", "imagination_horizon",
                     "num_envs_per_env_runner"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImagineConfig.{name}={getattr(self, name)}; must be >= 1")


# -- the agent's policy ------------------------------------------------------------------------------
def load_policy(checkpoint: str):
    """The RL module of an RLlib algorithm checkpoint (its learner's copy)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = os.path.join(checkpoint, "learner_group", "learner", "rl_module", "default_policy")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{checkpoint} is not an RLlib algorithm checkpoint (no {path})")
    return RLModule.from_checkpoint(path)


def _sample_actions(module, obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> np.ndarray:
    """Actions sampled from the module's distribution for a batch of observations; uniform without one."""
    if module is None:
        return rng.integers(0, num_actions, len(obs))
    import torch
    from ray.rllib.core.columns import Columns

    with torch.inference_mode():
        logits = module.forward_inference({Columns.OBS: torch.from_numpy(obs)})[Columns.ACTION_DIST_INPUTS]
        probs = torch.softmax(logits.float(), -1).numpy().astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    u = rng.random((len(obs), 1))
    return np.minimum((probs.cumsum(1) < u).sum(1), num_actions - 1)


def play_real_games(env_id: str, checkpoint: str | None, *, episodes: int, max_steps: int, seed: int,
                    repeat_action_probability: float, dim: int = 84, framestack: int = 4,
                    batch: int = 16, action_repeat: int = 1) -> dict[str, np.ndarray]:
    """Full real games of one agent (a checkpoint, or uniform-random with None), `batch` games stepped
    in lockstep with one policy forward pass. Each game goes through the agent's training wrappers
    (workers/atari.py): a lost life ends the wrappers' episode, and the game goes on with their reset
    (no-ops, FIRE) until game over. `action_repeat` T plays at the agent's imagined rate: each
    decision holds for T recorded steps (ALE frame skip 4T), as one imagined step generates T frames.
    Returns returns, lengths (agent decisions; the wrappers' reset steps not counted) and truncated
    per game. A game that ends inside the wrappers' reset steps is not told apart."""
    from ray.rllib.env.wrappers.atari_wrappers import EpisodicLifeEnv, get_wrapper_by_cls

    from workers.atari import EnvSettings, make_atari_env

    settings = dataclasses.asdict(EnvSettings(frameskip=4 * action_repeat,
                                              repeat_action_probability=repeat_action_probability))
    module = load_policy(checkpoint) if checkpoint else None
    rng = np.random.default_rng(seed)
    returns, lengths, truncated = [], [], []
    started = 0
    while started < episodes:
        n = min(batch, episodes - started)
        envs = [make_atari_env({"env_id": env_id, "settings": settings, "dim": dim, "framestack": framestack})
                for _ in range(n)]
        lives = [get_wrapper_by_cls(e, EpisodicLifeEnv) for e in envs]
        obs = np.stack([e.reset(seed=seed * 100_003 + started + i)[0] for i, e in enumerate(envs)])
        ret, steps, alive = np.zeros(n), np.zeros(n, np.int64), np.ones(n, bool)
        cut = np.zeros(n, bool)
        num_actions = int(envs[0].action_space.n)
        while alive.any():
            idx = np.flatnonzero(alive)
            acts = _sample_actions(module, obs[idx].astype(np.float32), rng, num_actions)
            for i, a in zip(idx, acts):
                o, r, term, trunc, _ = envs[i].step(int(a))
                ret[i] += r
                steps[i] += 1
                if term and (lives[i] is None or lives[i].was_real_terminated):
                    alive[i] = False  # game over, also on the capped step
                elif trunc or steps[i] >= max_steps:  # the emulator's frame limit, or the cap
                    alive[i], cut[i] = False, True
                elif term:
                    o, _ = envs[i].reset()  # a lost life: the game goes on
                obs[i] = o
        for e in envs:
            e.close()
        returns += ret.tolist()
        lengths += steps.tolist()
        truncated += cut.tolist()
        started += n
    return {"returns": np.asarray(returns, np.float64), "lengths": np.asarray(lengths, np.int64),
            "truncated": np.asarray(truncated, bool)}


def bootstrap_mean_ci(x: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `x` (one value per game)."""
    if len(x) < 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stratified_mean_resamples([x], np.random.default_rng(seed), n_boot), [2.5, 97.5])
    return float(lo), float(hi)


def collecting_checkpoint(data_root: str, game: str) -> str | None:
    """The PPO checkpoint that recorded `game` in this collection (its manifest), if one was trained."""
    for path in sorted(glob.glob(os.path.join(data_root, "runs", "*.json"))):
        ckpt = json.loads(Path(path).read_text()).get("games", {}).get(game, {}).get("checkpoint")
        if ckpt and os.path.isdir(ckpt):
            return ckpt
    return None


def data_fingerprint(data_root: str, game: str) -> str:
    """A short hash of the Parquet files (names, sizes) of one game's collection: heads trained on
    other data are not reused."""
    import hashlib

    from workers.clips import parquet_files

    files = [f for f in parquet_files(data_root) if f"game={game}" in f] or parquet_files(data_root)
    blob = "\n".join(f"{os.path.relpath(f, data_root)}:{os.path.getsize(f)}" for f in sorted(files))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# -- the stage ---------------------------------------------------------------------------------------
def _train_heads(cfg: ImagineConfig) -> dict[str, Any]:
    """Runs as a Ray task: heads trained and saved unless the folder has them; test-split scores."""
    from workers.reward_model import RewardModelConfig, heads_scores, load_heads, save_heads, train_heads

    device = "cuda" if cfg.use_gpu else "cpu"
    want = {"data": data_fingerprint(cfg.data_root, cfg.game), "steps": cfg.heads_steps,
            "max_pairs": cfg.heads_max_pairs, "seed": cfg.seed}
    try:
        heads = load_heads(cfg.model_path, device=device)
        if heads.meta.get("trained_for") != want:  # other data or settings: not these heads
            raise FileNotFoundError("stale heads")
        report = {"reused": True}
    except FileNotFoundError:
        heads, report = train_heads(RewardModelConfig(steps=cfg.heads_steps, max_pairs=cfg.heads_max_pairs,
                                                      seed=cfg.seed), cfg.data_root, cfg.game, device=device)
        save_heads(cfg.model_path, heads, {"data_root": cfg.data_root, "game": cfg.game, "report": report,
                                           "trained_for": want})
        heads = load_heads(cfg.model_path, device=device)
    try:
        scores = heads_scores(heads, cfg.data_root, cfg.game, "test")
    except ValueError as exc:  # e.g. no test pairs: the agent still trains
        scores = {"error": str(exc)}
    return {"report": report, "test": scores}


def _imagination_env_config(cfg: ImagineConfig) -> dict[str, Any]:
    from workers.imagination import ImaginationConfig

    return dataclasses.asdict(ImaginationConfig(
        world_model=cfg.model_path, data_root=cfg.data_root, game=cfg.game, split="train",
        max_contexts=cfg.max_contexts, action_repeat=cfg.action_repeat, max_steps=cfg.imagination_horizon,
        sample_steps=cfg.sample_steps, heads=True, device="auto", seed=cfg.seed))


def build_imagination_ppo(cfg: ImagineConfig):
    """PPO (the collecting agent's network and losses, workers/rollout.py) on the imagination env."""
    from workers.imagination import ENV_NAME, register_imagination_env
    from workers.atari import EnvSettings, resolve_env_id
    from workers.rollout import AgentConfig, ppo_config

    register_imagination_env()
    agent = AgentConfig(train_batch_size=cfg.train_batch_size, minibatch_size=cfg.minibatch_size,
                        num_epochs=cfg.num_epochs, lr=cfg.lr, seed=cfg.seed)
    base = ppo_config(resolve_env_id(cfg.game), agent, EnvSettings(), num_env_runners=cfg.num_env_runners,
                      cpus_per_env_runner=cfg.cpus_per_env_runner,
                      num_envs_per_env_runner=cfg.num_envs_per_env_runner,
                      gpus_per_env_runner=cfg.gpus_per_env_runner, learner_gpus=cfg.learner_gpus)
    config = base.environment(env=ENV_NAME, clip_rewards=True).env_runners(gym_env_vectorize_mode="vector_entry_point")
    config.env_config = _imagination_env_config(cfg)  # replaced, not merged into the real game's settings
    return config


def generation_seconds(algo) -> float:
    """Seconds the runners' imagination envs spent generating and reading heads so far."""
    def seconds(runner) -> float:
        games = getattr(runner.env.unwrapped, "games", None)
        return float(sum(games.seconds.values())) if games is not None else 0.0

    return float(sum(algo.env_runner_group.foreach_env_runner(seconds, local_env_runner=False) or [0.0]))


def main(cfg: ImagineConfig, tracking_uri: str | None = None) -> dict[str, pd.DataFrame]:
    import ray

    from workers.atari import resolve_env_id

    if not cfg.model_path or not cfg.data_root or not cfg.game:
        raise ValueError("ImagineConfig needs model_path, data_root and game")
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().resolve()),
                              name=cfg.name or f"imagine-{cfg.game}")
    ensure_ray()
    out_dir = Path(cfg.run_dir) / "imagine" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    env_id = resolve_env_id(cfg.game)
    tables: dict[str, pd.DataFrame] = {}
    with Tracker(cfg.run_dir, cfg.name, tracking_uri=tracking_uri, tags={"job": "imagine"}) as tracker:
        tracker.log_params(cfg)
        t0 = time.time()
        heads = ray.get(ray.remote(_train_heads).options(num_cpus=cfg.num_cpus, num_gpus=1 if cfg.use_gpu else 0)
                        .remote(cfg))
        rows = [{"game": cfg.game, "event": k, **v} for k, v in heads["test"].items() if isinstance(v, dict)]
        tables["heads"] = pd.DataFrame(rows)
        print(f"[imagine {cfg.game}] heads ({time.time() - t0:.0f} s): {json.dumps(heads['test'], default=str)[:600]}",
              flush=True)
        for r in rows:
            tracker.log_metrics({f"heads/{r['event']}/{k}": float(v) for k, v in r.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)

        algo = build_imagination_ppo(cfg).build_algo()
        curve, steps, it, t_train = [], 0, 0, time.time()
        try:
            gen_before = 0.0
            while steps < cfg.train_steps:
                t_it = time.time()
                res = algo.train()
                it += 1
                runners = res.get("env_runners", {})
                steps = int(runners.get("num_env_steps_sampled_lifetime", steps + cfg.train_batch_size))
                gen = generation_seconds(algo)
                wall = time.time() - t_it
                row = {"iteration": it, "steps": steps, "seconds": round(time.time() - t_train, 2),
                       "imagined_return_mean": float(runners.get("episode_return_mean", float("nan"))),
                       "imagined_length_mean": float(runners.get("episode_len_mean", float("nan"))),
                       "generation_share": (gen - gen_before) / wall / max(cfg.num_env_runners, 1) if wall else 0.0}
                gen_before = gen
                curve.append(row)
                tracker.log_metrics({f"imagine/{k}": v for k, v in row.items() if k != "iteration"}, step=it)
                print(f"[imagine {cfg.game}] iter={it} steps={steps} return={row['imagined_return_mean']:.2f} "
                      f"generation_share={row['generation_share']:.2f}", flush=True)
            checkpoint = str(Path(cfg.run_dir) / "agents" / cfg.name)
            algo.save_to_path(checkpoint)
        finally:
            algo.stop()
        tables["learning_curve"] = pd.DataFrame(curve)

        play = ray.remote(play_real_games).options(num_cpus=cfg.num_cpus)
        checkpoints = {"imagination": checkpoint, "random": None, "ppo_real": collecting_checkpoint(cfg.data_root,
                                                                                                     cfg.game)}
        jobs = {a: play.remote(env_id, checkpoints[a], episodes=cfg.eval_episodes,
                               max_steps=max(cfg.eval_max_steps // cfg.action_repeat, 1), seed=cfg.seed,
                               repeat_action_probability=cfg.eval_repeat_action_probability,
                               action_repeat=cfg.action_repeat if a == "imagination" else 1)
                for a in cfg.agents if a != "ppo_real" or checkpoints[a]}
        if "ppo_real" in cfg.agents and not checkpoints["ppo_real"]:
            print(f"[imagine {cfg.game}] no collecting PPO checkpoint in {cfg.data_root}: ppo_real not scored",
                  flush=True)
        scored = {a: ray.get(j) for a, j in jobs.items()}
        rows = []
        for a, s in scored.items():
            lo, hi = bootstrap_mean_ci(s["returns"], seed=cfg.seed)
            rows.append({"game": cfg.game, "agent": a, "return_mean": float(s["returns"].mean()), "return_ci_low": lo,
                         "return_ci_high": hi, "episodes": len(s["returns"]), "truncated": int(s["truncated"].sum()),
                         "seeds": 1, "return_std": float(s["returns"].std(ddof=1)) if len(s["returns"]) > 1 else 0.0,
                         "length_mean": float(s["lengths"].mean()), "max_steps": cfg.eval_max_steps})
            tracker.log_metrics({f"real/{a}/return_mean": rows[-1]["return_mean"],
                                 f"real/{a}/return_ci_low": lo, f"real/{a}/return_ci_high": hi,
                                 f"real/{a}/truncated": rows[-1]["truncated"]}, step=0)
        tables["imagination"] = pd.DataFrame(rows, columns=IMAGINATION_COLUMNS)
        np.savez_compressed(out_dir / "returns.npz", **{f"{a}__{k}": v for a, s in scored.items() for k, v in s.items()})
        for name, df in tables.items():
            df.to_csv(out_dir / f"{name}.csv", index=False)
            tracker.log_table(df, f"tables/{name}.json")
        (out_dir / "meta.json").write_text(json.dumps({"checkpoint": checkpoint, "config": dataclasses.asdict(cfg),
                                                       "heads": heads}, indent=1, default=str))
        print(tables["imagination"].to_string(index=False), flush=True)
    return tables


if __name__ == "__main__":
    cfg, uri = cli.parse_job(ImagineConfig, description=__doc__)
    main(cfg, tracking_uri=uri)
