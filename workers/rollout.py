"""RLlib PPO for one Atari game: train it, and record raw-frame rollouts in its env runners.

Recording runs on the algorithm's remote env runners. Each steps its vector of envs with its
(trained or random) policy through `RecordingLoop`, then drains the RawFrameRecorder inside every
sub-env: `write_on_runner` compresses the rows and writes them as one Parquet file straight from
the runner (only a few counters go back to the driver); `record_on_runner` returns them as an
Arrow table instead.

Why not `EnvRunner.sample()`: it builds RLlib episodes (every 84x84x4 float observation kept and
re-stacked), runs the connector pipelines and logs metrics on every step, all of which recording
throws away; measured on one core it cost more than the emulator and the policy together. The
recording loop keeps what matters: the runner's env (with the agent's wrappers) and its RL module,
loaded with the checkpoint's weights (`load_recorders`, which checks each runner holds them), and
the module's own action distribution.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers import schema as S
from workers.atari import EnvSettings, find_recorder, make_atari_env

ENV_NAME = "awm-atari"


@dataclass(frozen=True)
class AgentConfig:
    """How the PPO agent sees the game and how much it trains."""

    dim: int = 84
    """agent observation size (RLlib's default CNNs take 42/64/84)"""
    framestack: int = 4
    """grey frames stacked for the agent"""
    conv_filters: tuple[tuple[int, int, int], ...] = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
    """(channels, kernel, stride) per conv layer: the Nature-DQN encoder. RLlib's own 84x84 default
    ends in a 256-channel 11x11 conv (~130M multiply-adds a frame, ~6 ms on one CPU core, 20x an
    ALE step); this one costs ~10x less and is the usual Atari PPO encoder"""
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
    learner_device: str = "cpu"
    """Where PPO's learner (the local one, in the collecting process) trains: "cpu", "cuda", or
    "auto" (cuda when that process sees a GPU)."""
    learner_threads: int = 0
    """torch CPU threads of the collecting process while PPO trains; 0 = torch's default (one per
    core). Several collections on one host each default to every core and then run far slower
    than one: cap it there."""
    inference_dtype: str = "float32"
    """dtype of the recording runners' policy forward pass: "float32" or "bfloat16" (CPUs with bf16
    instructions run the encoder about twice as fast; actions are sampled from float32 logits
    either way, and replays use the recorded actions)"""

    def __post_init__(self) -> None:
        if self.learner_device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"AgentConfig.learner_device={self.learner_device!r}; expected 'cpu', 'cuda' or 'auto'")
        if self.inference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"AgentConfig.inference_dtype={self.inference_dtype!r}; expected 'float32' or 'bfloat16'")
        if self.learner_threads < 0:
            raise ValueError(f"AgentConfig.learner_threads={self.learner_threads} must be >= 0")

    def resolved_learner_device(self) -> str:
        """"cpu" or "cuda" for this process; "cuda" without a visible GPU is an error."""
        import torch

        if self.learner_device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.learner_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("AgentConfig.learner_device='cuda' but this process sees no GPU "
                             "(use 'auto' to fall back to the CPU)")
        return self.learner_device


def ppo_config(env_id: str, agent: AgentConfig, settings: EnvSettings, *, num_env_runners: int,
               cpus_per_env_runner: float, num_envs_per_env_runner: int = 1,
               rollout_fragment_length: int | str = "auto", record: dict | None = None,
               gpus_per_env_runner: float = 0.0, learner_gpus: float = 0):
    """One PPOConfig builder chain for training (record=None) and recording (record=dict of
    run_id, seed, test_fraction, val_fraction). Several envs per runner batch the policy's forward pass and
    RLlib's per-step connector work over the envs."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_atari_env)  # RLlib takes registered names, not bare functions

    env_config = dict(env_id=env_id, settings=asdict(settings), dim=agent.dim,
                      framestack=agent.framestack, record=record is not None, **(record or {}))
    if record is not None:
        env_config["inference_dtype"] = agent.inference_dtype  # read by RecordingLoop
    return (
        PPOConfig()
        .environment(env=ENV_NAME, env_config=env_config, clip_rewards=True)
        .env_runners(num_env_runners=num_env_runners,
                     num_envs_per_env_runner=num_envs_per_env_runner,
                     num_cpus_per_env_runner=cpus_per_env_runner,
                     num_gpus_per_env_runner=gpus_per_env_runner,
                     rollout_fragment_length=rollout_fragment_length)
        .learners(num_learners=0, num_gpus_per_learner=learner_gpus)  # the local learner, on GPU 0 if 1
        .training(train_batch_size_per_learner=agent.train_batch_size,
                  minibatch_size=agent.minibatch_size, num_epochs=agent.num_epochs, lr=agent.lr,
                  vf_loss_coeff=0.5, entropy_coeff=0.01, clip_param=0.1, grad_clip=0.5,
                  lambda_=0.95, gamma=0.99)
        .rl_module(model_config=DefaultModelConfig(
            vf_share_layers=True,
            conv_filters=[[c, [k, k], st] for c, k, st in agent.conv_filters]))
        .debugging(seed=agent.seed, log_level="ERROR")
    )


def train_ppo(env_id: str, agent: AgentConfig, checkpoint_dir: str, *, num_env_runners: int,
              cpus_per_env_runner: float, log=print) -> str:
    """Train PPO for `agent.train_steps` env steps; save and return the checkpoint directory."""
    import torch

    settings = EnvSettings(repeat_action_probability=agent.train_repeat_action_probability)
    device = agent.resolved_learner_device()
    threads = torch.get_num_threads()
    if agent.learner_threads:
        torch.set_num_threads(agent.learner_threads)
    log(f"[train {env_id}] PPO learner on {device}, {torch.get_num_threads()} CPU threads")

    def build(dev: str):
        return ppo_config(env_id, agent, settings, num_env_runners=num_env_runners,
                          cpus_per_env_runner=cpus_per_env_runner,
                          learner_gpus=1 if dev == "cuda" else 0).build_algo()

    try:
        try:
            algo = build(device)
        except Exception as e:  # "auto" means the GPU where it works: fall back, say so
            if device != "cuda" or agent.learner_device != "auto":
                raise
            log(f"[train {env_id}] PPO learner on cuda failed ({type(e).__name__}: {str(e)[:200]}); "
                f"training on the CPU")
            algo = build("cpu")
    except BaseException:
        torch.set_num_threads(threads)
        raise
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
        torch.set_num_threads(threads)
    return checkpoint_dir


def build_recorder_algo(env_id: str, agent: AgentConfig, settings: EnvSettings, *,
                        num_env_runners: int, cpus_per_env_runner: float, run_id: str, seed: int,
                        test_fraction: float, checkpoint: str | None, val_fraction: float = 0.0,
                        num_envs_per_env_runner: int = 1, gpus_per_env_runner: float = 0.0):
    """A PPO algorithm whose env runners record; weights from `checkpoint` when given. With
    `gpus_per_env_runner` > 0 each runner holds its copy of the module on that GPU share."""
    cfg = ppo_config(env_id, agent, settings, num_env_runners=num_env_runners,
                     cpus_per_env_runner=cpus_per_env_runner,
                     num_envs_per_env_runner=num_envs_per_env_runner,
                     gpus_per_env_runner=gpus_per_env_runner,
                     record=dict(run_id=run_id, seed=seed, test_fraction=test_fraction,
                                 val_fraction=val_fraction))
    algo = cfg.build_algo()
    if checkpoint is not None:
        # Only the module: optimizer and metrics of the training run are irrelevant here.
        component = "learner_group/learner/rl_module"
        algo.restore_from_path(os.path.join(checkpoint, component), component=component)
        load_recorders(algo)
    return algo


def _digest(state: dict) -> dict[str, float]:
    """{parameter: float64 sum} of a module state (nested by module id or not): equal weights, equal digest."""
    out: dict[str, float] = {}
    for name, value in state.items():
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v for k, v in _digest(value).items()})
        elif hasattr(value, "shape"):
            out[name] = float(np.asarray(value, dtype=np.float64).sum())
    return out


def load_recorders(algo) -> None:
    """Load the learner's (restored) module into every recording env runner, waiting for each, and
    check that each holds exactly those weights. `restore_from_path` hands them to the runners
    asynchronously, and RLlib drops that request while the one the build sent is still in flight
    (one per runner): left to it, a runner kept its initial weights and recorded an untrained policy."""
    import ray
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
                                         inference_only=True)[COMPONENT_LEARNER][COMPONENT_RL_MODULE]
    weights = state.get(DEFAULT_MODULE_ID, state)
    ref = ray.put({COMPONENT_RL_MODULE: weights})  # no weights sequence number: always applied
    group = algo.env_runner_group
    group.foreach_env_runner("set_state", kwargs={"state": ref}, local_env_runner=False)
    want = _digest(weights)
    held = group.foreach_env_runner(lambda runner: _digest(runner.module.get_state(inference_only=True)),
                                    local_env_runner=False)
    if len(held) != group.num_remote_env_runners():
        raise RuntimeError(f"{group.num_remote_env_runners()} recording env runners, {len(held)} answered with "
                           f"their weights: the checkpoint's policy could not be checked on every runner")
    for i, got in enumerate(held):
        differ = sorted(k for k in got if k not in want or not np.isclose(got[k], want[k], rtol=1e-6, atol=1e-9))
        if differ or not got:
            raise RuntimeError(f"recording env runner {i} does not hold the checkpoint's policy weights "
                               f"(differing: {differ[:3] or 'no parameter'})")


class RecordingLoop:
    """Steps a runner's vector env with its RL module: one batched forward pass for all sub-envs
    per step, actions drawn from the module's action distribution (its mode when not exploring),
    or uniform ones for the random policy. Kept on the runner so a game runs on across rounds."""

    def __init__(self, runner):
        import torch

        self.env, self.module, self.num_envs = runner.env, runner.module, runner.num_envs
        # The policy's forward dtype (AgentConfig.inference_dtype); the module already holds the
        # restored weights, which a recording runner never receives again.
        self.dtype = getattr(torch, dict(runner.config.env_config).get("inference_dtype", "float32"))
        if self.module is not None and self.dtype != torch.float32:
            self.module.to(self.dtype)
        # The batched observation is read (by the policy) before the next step overwrites it, so
        # gymnasium's defensive deep copy of it each step (~0.07 ms a sub-env step, a tenth of the
        # env stack) is not needed. Recording runners never run RLlib's own sample().
        vec = self.env.unwrapped
        if hasattr(vec, "copy"):
            vec.copy = False
        self.num_actions = int(self.env.single_action_space.n)
        # Seeded per runner: the random policy's actions are reproducible for a run's seed.
        self.rng = np.random.default_rng([int(runner.config.seed or 0), int(runner.worker_index)])
        self.obs: np.ndarray | None = None  # (N, dim, dim, framestack) float32, the agent's view
        self.last: np.ndarray | None = None  # (N,) the random policy's previous actions
        # Where a runner's recording time goes, cumulative (benchmarks, progress lines).
        self.seconds = dict(policy=0.0, env=0.0, drain=0.0, write=0.0)

    @staticmethod
    def of(runner) -> "RecordingLoop":
        loop = getattr(runner, "_recording_loop", None)
        if loop is None:
            loop = runner._recording_loop = RecordingLoop(runner)
        return loop

    def actions(self, explore: bool, random_actions: bool, repeat: float = 0.0, epsilon: float = 0.0) -> np.ndarray:
        """One action per sub-env: uniform ones (`random_actions`, each kept with probability
        `repeat`), else the module's; with `epsilon`, each sub-env's action is replaced by a uniform
        one with that probability (epsilon-greedy: wider action coverage than the policy's own)."""
        acts = self._actions(explore, random_actions, repeat)
        if epsilon > 0:
            acts = np.where(self.rng.random(self.num_envs) < epsilon,
                            self.rng.integers(0, self.num_actions, self.num_envs), acts)
        return acts

    def _actions(self, explore: bool, random_actions: bool, repeat: float) -> np.ndarray:
        import torch
        from ray.rllib.core.columns import Columns

        if random_actions:
            # Uniform actions; with `repeat`, each sub-env keeps its previous action with that
            # probability: the policy holds its choice (not the emulator's sticky actions), so the
            # recorded action stays the executed one.
            new = self.rng.integers(0, self.num_actions, self.num_envs)
            if repeat > 0 and self.last is not None:
                new = np.where(self.rng.random(self.num_envs) < repeat, self.last, new)
            self.last = new
            return new
        with torch.inference_mode():
            device = next(self.module.parameters()).device  # the GPU share, if the runner has one
            batch = {Columns.OBS: torch.from_numpy(self.obs).to(device, self.dtype, non_blocking=True)}
            if explore:
                logits = self.module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS].float()
                dist = self.module.get_exploration_action_dist_cls().from_logits(logits)
            else:
                logits = self.module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS].float()
                dist = self.module.get_inference_action_dist_cls().from_logits(logits)
                dist = dist.to_deterministic()
            return dist.sample().cpu().numpy()  # (N,)

    def run(self, num_timesteps: int, explore: bool, random_actions: bool, repeat: float = 0.0,
            epsilon: float = 0.0) -> None:
        """At least `num_timesteps` agent steps over all sub-envs. Sub-envs that end reset
        themselves (gymnasium vector autoreset); the recorders see those resets."""
        clock, sec = time.perf_counter, self.seconds
        if self.obs is None:
            t = clock()
            self.obs, _ = self.env.reset()
            sec["env"] += clock() - t
        for _ in range(-(-num_timesteps // self.num_envs)):
            t0 = clock()
            actions = self.actions(explore, random_actions, repeat, epsilon)
            t1 = clock()
            self.obs, *_ = self.env.step(actions)
            sec["policy"] += t1 - t0
            sec["env"] += clock() - t1


def _drain(runner, final: bool) -> pa.Table:
    recorders = [find_recorder(e) for e in runner.env.unwrapped.envs]
    if final:
        for r in recorders:
            r.flush_open()
    return pa.concat_tables([r.drain() for r in recorders])


def record_on_runner(runner, num_timesteps: int, explore: bool, random_actions: bool,
                     final: bool) -> pa.Table:
    """Runs on an env runner: sample, then drain every sub-env's recorder into one table."""
    if num_timesteps > 0:
        RecordingLoop.of(runner).run(num_timesteps, explore, random_actions)
    return _drain(runner, final)


def write_on_runner(runner, out_dir: str, num_timesteps: int, explore: bool, random_actions: bool,
                    final: bool, repeat: float = 0.0, epsilon: float = 0.0) -> dict:
    """Runs on an env runner: sample, drain, and write the rows as one zstd Parquet file in
    `out_dir` (temporary name, then rename, so a listing never shows half a file). `out_dir` must
    be visible to every node (a local path on one machine, shared storage on a cluster). Returns
    `runner_stats` plus the file written (None when no rows), its row count, the runner's
    cumulative seconds per phase (policy, env, drain, write) and its policy's forward dtype."""
    loop = RecordingLoop.of(runner)
    if num_timesteps > 0:
        loop.run(num_timesteps, explore, random_actions, repeat, epsilon)
    t0 = time.perf_counter()
    table = _drain(runner, final)
    t1 = time.perf_counter()
    path = None
    if table.num_rows:
        os.makedirs(out_dir, exist_ok=True)
        name = f"w{runner.worker_index}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
        path, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".{name}.tmp")
        write_episode_table(table, tmp)
        os.replace(tmp, path)
    loop.seconds["drain"] += t1 - t0
    loop.seconds["write"] += time.perf_counter() - t1
    return dict(runner_stats(runner), file=path, rows=table.num_rows, seconds=dict(loop.seconds),
                policy_dtype=str(loop.dtype).removeprefix("torch."))


def write_episode_table(table: pa.Table, path: str) -> None:
    """One Parquet file in the dataset's layout. Row groups of ~1k frames (~100 MB raw) bound a
    reader's memory per group. The frame column gets neither a dictionary nor min/max statistics
    (each frame is one opaque 100,800-byte value: both would cost time and skip nothing)."""
    scalars = [c for c in table.column_names if c != S.FRAME]
    pq.write_table(table, path, compression=S.COMPRESSION, compression_level=S.COMPRESSION_LEVEL,
                   row_group_size=1024, use_dictionary=scalars, write_statistics=scalars)


def runner_stats(runner) -> dict:
    """Runs on an env runner: counters for progress lines (returns of games closed since last call)."""
    recorders = [find_recorder(e) for e in runner.env.unwrapped.envs]
    returns = [x for r in recorders for x in r.finished_returns]
    for r in recorders:
        r.finished_returns.clear()
    return dict(steps=sum(r.steps_recorded for r in recorders), returns=returns)
