"""Speed of the world model as an RL environment: imagined agent steps and generated frames per second.

Steps `WorldModelVectorEnv` (workers/imagination.py) with uniform-random actions for each batch size
(imagined games per call), frames per agent step T (`action_repeat`) and heads on/off: agent
steps/s = batch x steps / seconds, frames/s = that x T. Autoresets (fresh contexts, FIRE) fall
inside the timed steps, as they do in training. With `--ppo-iterations` > 0, RLlib PPO also trains
in imagination for that many iterations at the largest batch of the first heads and T setting, and `generation_share` is the share
of an iteration's wall time spent generating and reading the heads.

    python -m benchmarks.bench_env --world-model runs/gpu/models/dit-Breakout --data-root runs/gpu/data \\
        --game Breakout --batch-sizes 1 64 256 --action-repeats 1 4 --ppo-iterations 3 \\
        --out docs/results/current/env_speed.csv
    python -m benchmarks.bench_env --random-model gpu --data-root runs/gpu/data ...   # no trained run needed
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, markdown_table, pick_device, write_rows
from pipeline.cli import parse_config

COLUMNS = ["gpu", "batch", "T", "euler_steps", "heads", "steps_per_s", "frames_per_s", "generation_share"]


@dataclass(frozen=True)
class BenchEnvConfig:
    world_model: str = ""
    """World-model folder (with heads/ for --heads on)."""
    random_model: str = ""
    """Instead of --world-model: random weights of this run_all preset's VAE and DiT (e.g. gpu), which
    cost exactly what trained ones do, written to <out's folder>/random_world_model with heads
    trained briefly on --data-root (speed only)."""
    data_root: str = ""
    """Dataset whose training split gives the starting contexts."""
    game: str = "Breakout"
    batch_sizes: tuple[int, ...] = (1, 64, 256)
    """Imagined games stepped per world-model call."""
    action_repeats: tuple[int, ...] = (1, 4)
    """Frames generated per agent step (T)."""
    heads: tuple[str, ...] = ("on", "off")
    """Reward/termination heads read ("on") or not ("off")."""
    sample_steps: int = 0
    """Euler steps; 0 = the model's own."""
    steps: int = 20
    """Timed agent steps per setting (after one untimed)."""
    max_steps: int = 500
    """Imagination horizon (agent steps before truncation)."""
    ppo_iterations: int = 0
    """PPO iterations in imagination for the generation share (0 = skip)."""
    ppo_batch: int = 0
    """PPO train batch; 0 = 4 vector steps of the first setting."""
    device: str = "auto"
    out: str = ""
    """CSV to write (empty = print only)."""


def table_meta_of(cfg: BenchEnvConfig) -> dict:
    """The caller's part of the table's .meta.json (common.table_meta adds commit, command, GPU, date)."""
    return {"device": device_name(pick_device(cfg.device)), "config": repr(cfg)}


def _vector_env(cfg: BenchEnvConfig, batch: int, T: int, heads: bool):
    from workers.imagination import ImaginationConfig, WorldModelVectorEnv

    icfg = ImaginationConfig(world_model=cfg.world_model, data_root=cfg.data_root, game=cfg.game, action_repeat=T,
                             heads=heads, sample_steps=cfg.sample_steps, max_steps=cfg.max_steps,
                             device=str(pick_device(cfg.device).type), max_contexts=64)
    return WorldModelVectorEnv(icfg, num_envs=batch)


def measure(cfg: BenchEnvConfig) -> list[dict]:
    device = pick_device(cfg.device)
    rows = []
    for heads in cfg.heads:
        for T in cfg.action_repeats:
            for batch in cfg.batch_sizes:
                env = _vector_env(cfg, batch, T, heads == "on")
                rng = np.random.default_rng(0)
                n = env.single_action_space.n
                env.reset(seed=0)
                env.step(rng.integers(0, n, batch))  # untimed: first-call allocations
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(cfg.steps):
                    env.step(rng.integers(0, n, batch))
                seconds = time.perf_counter() - t0  # predict returns host arrays: the work is done
                sps = batch * cfg.steps / seconds
                rows.append({"gpu": device_name(device), "batch": batch, "T": T,
                             "euler_steps": env.games.model.sampler.cfg.num_steps, "heads": heads,
                             "steps_per_s": round(sps, 2), "frames_per_s": round(sps * T, 2),
                             "generation_share": None})
                print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
                del env
    if cfg.out:  # the measured rows are kept even if the PPO part below fails or runs out of time
        write_rows(rows, cfg.out, table_meta_of(cfg))
    if cfg.ppo_iterations > 0:  # at the largest batch of the first heads and T setting
        first = [r for r in rows if r["heads"] == cfg.heads[0] and r["T"] == cfg.action_repeats[0]]
        row = max(first, key=lambda r: r["batch"])
        row["generation_share"] = round(ppo_generation_share(cfg, row), 3)
    return rows


def ppo_generation_share(cfg: BenchEnvConfig, row: dict) -> float:
    """Share of PPO iterations' wall time that the runner's env spent generating (+ heads)."""
    import ray

    from pipeline.imagine import ImagineConfig, build_imagination_ppo, generation_seconds

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    batch = row["batch"]
    icfg = ImagineConfig(data_root=cfg.data_root, game=cfg.game, model_path=cfg.world_model,
                         action_repeat=row["T"], sample_steps=cfg.sample_steps, imagination_horizon=cfg.max_steps,
                         train_batch_size=cfg.ppo_batch or 4 * batch, minibatch_size=min(128, cfg.ppo_batch or 4 * batch),
                         num_epochs=1, num_env_runners=1, num_envs_per_env_runner=batch, cpus_per_env_runner=1,
                         gpus_per_env_runner=0.5 if pick_device(cfg.device).type == "cuda" else 0.0,
                         learner_gpus=0.5 if pick_device(cfg.device).type == "cuda" else 0.0)
    config = build_imagination_ppo(icfg)
    if row["heads"] == "off":
        config.env_config = {**config.env_config, "heads": False}
    algo = config.build_algo()
    try:
        algo.train()  # untimed: the runner's first reset and the learner's warm-up
        gen0, t0 = generation_seconds(algo), time.perf_counter()
        for _ in range(cfg.ppo_iterations):
            algo.train()
        return (generation_seconds(algo) - gen0) / (time.perf_counter() - t0)
    finally:
        algo.stop()


def random_world_model(preset: str, data_root: str, game: str, path: Path) -> str:
    """A world model of `preset`'s architecture with random weights, and heads trained 20 steps."""
    from pipeline.presets import PRESETS
    from workers.reward_model import RewardModelConfig, save_heads, train_heads
    from models.config import config_from_dict
    from workers.train_dit import TrainDiTConfig, build_dit
    from workers.train_vae import TrainVAEConfig, build_vae
    from workers.world_model import save_world_model, world_model_meta

    p = PRESETS[preset]()
    vcfg, dcfg = config_from_dict(TrainVAEConfig, p.vae), config_from_dict(TrainDiTConfig, p.dit)
    torch.manual_seed(0)
    vae = build_vae(vcfg)
    dit = build_dit(dcfg, vae.cfg.latent_channels)
    meta = world_model_meta(dit, latent_scale=1.0, n_cond=dcfg.n_cond, horizon=dcfg.horizon,
                            action_mode=dcfg.action_mode, sample_steps=dcfg.sample_steps,
                            trained_horizons=tuple(dcfg.horizon_choices) or (dcfg.horizon,))
    save_world_model(path, vae, dit, meta)
    heads, report = train_heads(RewardModelConfig(steps=20, max_pairs=512), data_root, game)
    save_heads(path, heads, {"report": report, "note": "random world model for speed measurements"})
    return str(path)


def main(cfg: BenchEnvConfig) -> list[dict]:
    if cfg.random_model:
        where = Path(cfg.out).parent if cfg.out else Path("runs")
        cfg = dataclasses.replace(cfg, world_model=random_world_model(cfg.random_model, cfg.data_root, cfg.game,
                                                                      where / "random_world_model"))
    if not cfg.world_model or not cfg.data_root:
        raise SystemExit("--world-model (or --random-model) and --data-root are required")
    rows = measure(cfg)
    print(markdown_table(rows, COLUMNS))
    if cfg.out:
        print(f"wrote {write_rows(rows, cfg.out, table_meta_of(cfg))}")
    return rows


if __name__ == "__main__":
    main(parse_config(BenchEnvConfig, description=__doc__))
