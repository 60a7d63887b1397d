"""Collection throughput and storage: recorded env steps/s vs raw ALE, bytes per frame.

    python -m benchmarks.bench_collect --steps 2000 --num-env-runners 2 --games Pong Breakout

Recorded = RLlib env runners stepping the full agent wrapper stack, PPO module inference (a
checkpoint trained for one tiny iteration: inference costs the same as a trained one's; or
uniform actions with `--policy random`, to see the recording path without inference),
raw-frame recording, zstd Parquet written by the runners, atomic swap. Raw = the bare ALE v5 env
(same settings: frameskip 4, no sticky actions) with random actions in the same number of
processes, measured just before and just after the recording on the same machine (it is shared:
the two figures show how much the load moved) and compared with their mean. "all" counts the
whole recording; "steady" the rounds after the first, without the sub-envs' first seeded resets
(each reloads the ROM, ~0.1 s; use several rounds: --steps a few times --steps-per-round x
--num-env-runners). The runners' time per
phase (policy forward, env step incl. the agent's wrappers, drain of the recorders, Parquet write)
shows what is left to win. Then the frames of the recorded files are re-encoded with other codecs
and layouts to show what the choice of a zstd binary column buys, in bytes and in write time.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import parse_config
from workers import schema as S
from workers.atari import EnvSettings, make_raw_env, resolve_env_id


@dataclass(frozen=True)
class BenchCollectConfig:
    """What is recorded, and how."""

    games: tuple[str, ...] = ("Pong", "Breakout")
    """ALE games recorded one after the other."""
    policy: str = dataclasses.field(default="ppo", metadata={"choices": ("ppo", "random")})
    """ppo: a PPO module's inference on every step; random: uniform actions, which leaves the
    recording path (wrappers, recorder, drain, write) alone"""
    profile_env: bool = False
    """Also profile the recording env stack alone (no Ray, no policy)."""
    steps: int = 2000
    """Recorded steps per game."""
    steps_per_round: int = 1000
    """Steps each env runner samples between writes."""
    num_env_runners: int = 2
    """Recording processes (and processes of the raw ALE baseline)."""
    num_envs_per_env_runner: int = 8
    """Envs each runner steps together."""
    gpus_per_env_runner: float = 0.0
    """GPU share per recording runner (policy inference on the GPU)."""
    num_cpus: int | None = None
    """CPUs of the benchmark's own Ray cluster; unset = every core."""
    inference_dtype: str = dataclasses.field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    """dtype of the recording runners' policy forward pass (AgentConfig.inference_dtype)"""


def _raw_worker(args) -> int:
    env_id, steps, seed = args
    env = make_raw_env(env_id, EnvSettings())
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    n = env.action_space.n
    for a in rng.integers(0, n, steps):
        _, _, term, trunc, _ = env.step(int(a))
        if term or trunc:
            env.reset()
    return steps


def raw_steps_per_s(env_id: str, steps: int, procs: int) -> float:
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_raw_worker, [(env_id, 10, i) for i in range(procs)])  # warm start-up
        t0 = time.time()
        done = sum(pool.map(_raw_worker, [(env_id, steps // procs, i) for i in range(procs)]))
        return done / (time.time() - t0)


def codec_bytes_per_frame(files: list[str]) -> dict[str, tuple[float, float]]:
    """Frames of `files` re-encoded: (bytes per frame, write ms per frame) for the stored binary
    layout under several Parquet codecs, for the older tensor layout (`large_list<uint8>` with a
    dictionary, zstd-3), and for PNG per frame."""
    import cv2
    from ray.data.extensions import ArrowTensorArray

    from workers.rollout import write_episode_table

    t = pa.concat_tables([pq.ParquetFile(f).read(columns=[S.FRAME]) for f in files])
    frames = S.frames_from_arrow(t[S.FRAME])
    n = t.num_rows
    binary = pa.table({S.FRAME: S.frames_to_arrow(frames)})
    out = {}

    def timed(write) -> tuple[float, float]:
        buf = io.BytesIO()
        t0 = time.perf_counter()
        write(buf)
        return buf.tell() / n, (time.perf_counter() - t0) / n * 1e3

    out["stored"] = timed(lambda b: write_episode_table(binary, b))
    for name, kw in (("snappy", dict(compression="snappy")),
                     ("zstd-1", dict(compression="zstd", compression_level=1)),
                     ("zstd-3", dict(compression="zstd", compression_level=3)),
                     ("zstd-9", dict(compression="zstd", compression_level=9))):
        out[name] = timed(lambda b, kw=kw: pq.write_table(binary, b, use_dictionary=False,
                                                          write_statistics=False, **kw))
    tensor = pa.table({S.FRAME: ArrowTensorArray.from_numpy(frames)})
    out["tensor zstd-3"] = timed(lambda b: pq.write_table(tensor, b, compression="zstd",
                                                          compression_level=3,
                                                          write_statistics=False))
    sample = frames[:: max(1, n // 200)]
    t0 = time.perf_counter()
    png = sum(len(cv2.imencode(".png", f)[1]) for f in sample)
    out["png"] = png / len(sample), (time.perf_counter() - t0) / len(sample) * 1e3
    return out


def profile_env_stack(env_id: str, vector_steps: int = 300, num_envs: int = 8) -> list[tuple[str, float]]:
    """cProfile of the recording env stack alone (no Ray, no policy): a gymnasium SyncVectorEnv
    of `num_envs` recorded, agent-wrapped envs stepped with random actions. Returns (function,
    ms per sub-env step) for the functions that take the most time of their own, and the total."""
    import cProfile
    import pstats
    from dataclasses import asdict

    import gymnasium as gym

    from workers.atari import make_atari_env

    cfg = dict(env_id=env_id, settings=asdict(EnvSettings()), dim=84, framestack=4, record=True,
               run_id="profile", seed=0, test_fraction=0.0)
    # copy=False as in workers/rollout.py's RecordingLoop
    venv = gym.vector.SyncVectorEnv([lambda: make_atari_env(cfg) for _ in range(num_envs)], copy=False)
    venv.reset(seed=0)
    rng = np.random.default_rng(0)
    n = int(venv.single_action_space.n)
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    for _ in range(vector_steps):
        venv.step(rng.integers(0, n, num_envs))
    total = time.perf_counter() - t0
    prof.disable()
    venv.close()
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    steps = vector_steps * num_envs
    top = sorted(((f"{os.path.basename(k[0])}:{k[2]}", v[2]) for k, v in stats.items()),
                 key=lambda r: -r[1])[:8]
    return [(name, sec / steps * 1e3) for name, sec in top] + [("total (profiled)", total / steps * 1e3)]


def main(cfg: BenchCollectConfig) -> None:
    import ray

    from pipeline.collect import CollectConfig
    from pipeline.collect import main as collect
    from workers.rollout import AgentConfig, train_ppo

    env_ids = [resolve_env_id(g) for g in cfg.games]
    # Its own cluster (address="local"): the figures are for this machine's cores alone.
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    agent = AgentConfig(dim=84, train_steps=128, train_batch_size=128, minibatch_size=64,
                        num_epochs=1, inference_dtype=cfg.inference_dtype)
    rows = []
    raw_before = {e: raw_steps_per_s(e, cfg.steps, cfg.num_env_runners) for e in env_ids}
    with tempfile.TemporaryDirectory() as tmp:
        for env_id in env_ids if cfg.policy == "ppo" else ():
            game = env_id.removeprefix("ALE/").removesuffix("-v5")
            train_ppo(env_id, agent, os.path.join(tmp, "ckpt", game), num_env_runners=1,
                      cpus_per_env_runner=0.5, log=lambda *_: None)
        m = collect(CollectConfig(data_root=os.path.join(tmp, "data"), run_id="bench",
                                  games=tuple(cfg.games), policy=cfg.policy,
                                  checkpoint=os.path.join(tmp, "ckpt", "{game}") if cfg.policy == "ppo" else None,
                                  steps_per_game=cfg.steps, steps_per_round=cfg.steps_per_round,
                                  num_env_runners=cfg.num_env_runners,
                                  num_envs_per_env_runner=cfg.num_envs_per_env_runner,
                                  gpus_per_env_runner=cfg.gpus_per_env_runner,
                                  agent=agent))
        ray.shutdown()
        for env_id in env_ids:
            game = env_id.removeprefix("ALE/").removesuffix("-v5")
            g = m["games"][game]
            raw = (raw_before[env_id], raw_steps_per_s(env_id, cfg.steps, cfg.num_env_runners))
            files = [os.path.join(d, f) for d, _, fs in
                     os.walk(os.path.join(tmp, "data", "episodes", f"game={game}")) for f in fs]
            rows.append((game, g["steps_per_s"], g["steady_steps_per_s"], raw, g["runner_seconds"],
                         g["bytes_per_frame"], codec_bytes_per_frame(files)))
    where = f" on {cfg.gpus_per_env_runner:g} GPU per runner" if cfg.gpus_per_env_runner else ""
    where += f", {cfg.inference_dtype} inference" if cfg.policy == "ppo" else ""
    print(f"\n{cfg.policy} policy{where}, {cfg.num_env_runners} processes ({cfg.num_envs_per_env_runner} "
          f"envs each when recording), {cfg.steps} recorded steps per game, {os.cpu_count()} CPU cores")
    print("| game | recorded steps/s: all / steady | raw ALE steps/s (before/after) | recorded/raw: "
          "all / steady | runner s: policy / env / drain / write |")
    print("|---|---|---|---|---|")
    for game, rec, steady, (r0, r1), sec, *_ in rows:
        raw = (r0 + r1) / 2
        st = f"{steady:.0f}" if steady else "-"
        st_share = f"{steady / raw:.0%}" if steady else "-"
        print(f"| {game} | {rec:.0f} / {st} | {raw:.0f} ({r0:.0f}/{r1:.0f}) | {rec / raw:.0%} / {st_share} "
              f"| {sec['policy']:.1f} / {sec['env']:.1f} / {sec['drain']:.1f} / "
              f"{sec['write']:.1f} |")
    if cfg.profile_env:
        for env_id in env_ids:
            print(f"\nWhere a sub-env step of the recording env stack goes ({env_id}, 8 envs, random "
                  "actions, no Ray, cProfile)")
            print("| function (own time) | ms per sub-env step |")
            print("|---|---|")
            for name, ms in profile_env_stack(env_id):
                print(f"| {name} | {ms:.3f} |")
    names = ["stored", "snappy", "zstd-1", "zstd-3", "zstd-9", "tensor zstd-3", "png"]
    print("\nBytes per frame (write ms per frame), the recorded frames re-encoded: binary column "
          "under each Parquet codec, the older tensor layout, PNG per frame")
    print("| game | manifest B/frame | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for game, *_, bpf, c in rows:
        print(f"| {game} | {bpf:.0f} | " + " | ".join(f"{c[k][0]:.0f} ({c[k][1]:.3f})" for k in names)
              + " |")


if __name__ == "__main__":
    main(parse_config(BenchCollectConfig, description=__doc__))
