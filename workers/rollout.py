"""RLlib PPO for one Atari game: train it, and record raw-frame rollouts in its env runners.

Recording runs on the algorithm's remote env runners: each samples with its (trained or random)
policy, and `record_on_runner` then drains the RawFrameRecorder inside each of the runner's envs
into one Arrow table. The table is the return value of an actor call, so the driver owns it in the
object store (it outlives the runner) and Ray Data writes it without it passing through the driver.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from workers.atari import EnvSettings, find_recorder, make_atari_env

ENV_NAME = "awm-atari"


@dataclass(frozen=True)
class AgentConfig:
    """How the PPO agent sees the game and how much it trains."""

    dim: int = 84
    """agent observation size (RLlib's default CNNs take 42/64/84)"""
    framestack: int = 4
    """grey frames stacked for the agent"""
    train_steps: int = 1_000_000
    """env steps of PPO training per game"""
    train_batch_size: int = 4000
    """PPO train batch per learner (env steps per iteration)"""
    minibatch_size: int = 128
    num_epochs: int = 4
    lr: float = 2.5e-4
    train_repeat_action_probability: float = 0.25
    """sticky actions while training (ALE v5 default: a more robust agent); recording uses 0"""
    seed: int = 0


def ppo_config(env_id: str, agent: AgentConfig, settings: EnvSettings, *, num_env_runners: int,
               cpus_per_env_runner: float, rollout_fragment_length: int | str = "auto",
               record: dict | None = None):
    """One PPOConfig builder chain for training (record=None) and recording (record=dict of
    run_id, seed, test_fraction)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_atari_env)  # RLlib takes registered names, not bare functions

    env_config = dict(env_id=env_id, settings=asdict(settings), dim=agent.dim,
                      framestack=agent.framestack, record=record is not None, **(record or {}))
    return (
        PPOConfig()
        .environment(env=ENV_NAME, env_config=env_config, clip_rewards=True)
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=1,
                     num_cpus_per_env_runner=cpus_per_env_runner,
                     rollout_fragment_length=rollout_fragment_length)
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=agent.train_batch_size,
                  minibatch_size=agent.minibatch_size, num_epochs=agent.num_epochs, lr=agent.lr,
                  vf_loss_coeff=0.5, entropy_coeff=0.01, clip_param=0.1, grad_clip=0.5,
                  lambda_=0.95, gamma=0.99)
        .rl_module(model_config=DefaultModelConfig(vf_share_layers=True))
        .debugging(seed=agent.seed, log_level="ERROR")
    )


def train_ppo(env_id: str, agent: AgentConfig, checkpoint_dir: str, *, num_env_runners: int,
              cpus_per_env_runner: float, log=print) -> str:
    """Train PPO for `agent.train_steps` env steps; save and return the checkpoint directory."""
    settings = EnvSettings(repeat_action_probability=agent.train_repeat_action_probability)
    algo = ppo_config(env_id, agent, settings, num_env_runners=num_env_runners,
                      cpus_per_env_runner=cpus_per_env_runner).build_algo()
    try:
        t0, steps, it = time.time(), 0, 0
        while steps < agent.train_steps:
            res = algo.train()
            it += 1
            runners = res.get("env_runners", {})
            steps = int(runners.get("num_env_steps_sampled_lifetime", steps + agent.train_batch_size))
            ret = runners.get("episode_return_mean", float("nan"))
            log(f"[train {env_id}] iter={it} steps={steps} steps/s={steps / (time.time() - t0):.0f} "
                f"life_return_mean={ret:.2f}")
        algo.save_to_path(checkpoint_dir)
    finally:
        algo.stop()
    return checkpoint_dir


def build_recorder_algo(env_id: str, agent: AgentConfig, settings: EnvSettings, *,
                        num_env_runners: int, cpus_per_env_runner: float, run_id: str, seed: int,
                        test_fraction: float, checkpoint: str | None):
    """A PPO algorithm whose env runners record; weights from `checkpoint` when given."""
    cfg = ppo_config(env_id, agent, settings, num_env_runners=num_env_runners,
                     cpus_per_env_runner=cpus_per_env_runner,
                     record=dict(run_id=run_id, seed=seed, test_fraction=test_fraction))
    algo = cfg.build_algo()
    if checkpoint is not None:
        # Only the module: optimizer and metrics of the training run are irrelevant here. The
        # component path contains "learner_group", so RLlib syncs the weights to the env runners.
        component = "learner_group/learner/rl_module"
        algo.restore_from_path(os.path.join(checkpoint, component), component=component)
    return algo


def record_on_runner(runner, num_timesteps: int, explore: bool, random_actions: bool,
                     final: bool) -> pa.Table:
    """Runs on an env runner: sample, then drain every sub-env's recorder into one table."""
    if num_timesteps > 0:
        runner.sample(num_timesteps=num_timesteps, explore=explore, random_actions=random_actions)
    recorders = [find_recorder(e) for e in runner.env.unwrapped.envs]
    if final:
        for r in recorders:
            r.flush_open()
    return pa.concat_tables([r.drain() for r in recorders])


def runner_stats(runner) -> dict:
    """Runs on an env runner: counters for progress lines (returns of games closed since last call)."""
    recorders = [find_recorder(e) for e in runner.env.unwrapped.envs]
    returns = [x for r in recorders for x in r.finished_returns]
    for r in recorders:
        r.finished_returns.clear()
    return dict(steps=sum(r.steps_recorded for r in recorders), returns=returns)
