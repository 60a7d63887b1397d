"""The world model as an RL environment (workers/imagination.py) and the real-game scoring of the
imagine stage (pipeline/imagine.py), on the session's tiny trained world model and real ALE games.
The whole stage (PPO in imagination, then the real game) runs in the smoke job (tests/test_job.py)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers import schema as S
from workers.clips import parquet_files
from workers.imagination import (ContextBank, ImaginationConfig, WorldModelEnv, WorldModelVectorEnv, agent_frame,
                                 make_imagination_env)

GAME = "Breakout"


@pytest.fixture(scope="module")
def model_with_heads(tiny_trained, tiny_split_root, tmp_path_factory) -> str:
    """A copy of the session's tiny world model with briefly trained reward/termination heads."""
    from workers.reward_model import RewardModelConfig, save_heads, train_heads

    path = tmp_path_factory.mktemp("imagination") / "world_model"
    shutil.copytree(tiny_trained[1], path)
    heads, report = train_heads(RewardModelConfig(steps=10, batch_size=8, max_pairs=64), tiny_split_root, GAME)
    save_heads(path, heads, {"report": report})
    return str(path)


def _cfg(model: str, root: str, **kw) -> ImaginationConfig:
    return ImaginationConfig(world_model=model, data_root=root, game=GAME, max_contexts=16, seed=0, **kw)


def test_env_passes_gymnasiums_checker_and_names_bad_actions(model_with_heads, tiny_split_root):
    from gymnasium.utils.env_checker import check_env

    env = WorldModelEnv(_cfg(model_with_heads, tiny_split_root, max_steps=3))
    check_env(env, skip_render_check=True)
    assert env.get_action_meanings()[:2] == ["NOOP", "FIRE"] and env.action_space.n == 4
    obs, info = env.reset(seed=5)
    assert obs.shape == S.FRAME_SHAPE and obs.dtype == np.uint8 and info["lives"] == env.unwrapped.ale.lives()
    with pytest.raises(ValueError, match=r"valid are 0\.\.3 \(NOOP, FIRE, RIGHT, LEFT\)"):
        env.step(4)
    with pytest.raises(TypeError, match="integers"):
        env.step(1.5)
    plain = WorldModelEnv(_cfg(model_with_heads, tiny_split_root, max_steps=3, heads=False))  # nothing ends early
    plain.reset()
    before = plain.games.frames_generated
    ends = [plain.step(a)[2:4] for a in (0, 2, 3)]
    assert plain.games.frames_generated == before + 3 and ends == [(False, False), (False, False), (False, True)]
    with pytest.raises(RuntimeError, match="before reset"):
        plain.step(0)
    # the first reset follows the config's seed: two envs of one config start from the same context
    again = WorldModelEnv(_cfg(model_with_heads, tiny_split_root, heads=False))
    assert again.reset()[1]["context"] == WorldModelEnv(_cfg(model_with_heads, tiny_split_root, heads=False)).reset()[1]["context"]
    # a chunk of T frames per agent step: one generated chunk, T frames counted
    chunky = WorldModelEnv(_cfg(model_with_heads, tiny_split_root, action_repeat=2))
    chunky.reset(seed=0)
    chunky.step(1)
    assert chunky.games.frames_generated == 2


def test_world_model_folder_without_heads_fails_at_make_with_the_command(tiny_trained, tiny_split_root, tmp_path):
    bare = tmp_path / "world_model"
    shutil.copytree(tiny_trained[1], bare, ignore=shutil.ignore_patterns("heads"))
    with pytest.raises(FileNotFoundError, match="imagine"):
        WorldModelEnv(_cfg(str(bare), tiny_split_root))
    WorldModelEnv(_cfg(str(bare), tiny_split_root, heads=False))  # speed tests may run without them


def test_contexts_are_consecutive_real_training_frames(tiny_split_root):
    bank = ContextBank(tiny_split_root, GAME, "train", n_cond=4, max_contexts=5, seed=1)
    t = pa.concat_tables([pq.read_table(f) for f in parquet_files(tiny_split_root)])
    t = t.filter(pa.compute.and_(pa.compute.equal(t[S.GAME], GAME), pa.compute.equal(t[S.SPLIT], "train")))
    eid, step = t[S.EPISODE_ID].to_numpy(zero_copy_only=False).astype(str), t[S.STEP].to_numpy()
    frames = S.frames_from_arrow(t[S.FRAME])
    assert 0 < len(bank) <= 5
    for k, (e, s0) in enumerate(bank.keys):
        rows = [int(np.flatnonzero((eid == e) & (step == s0 + i))[0]) for i in range(4)]
        assert np.array_equal(bank.frames[k], frames[rows])
        assert list(bank.past_actions[k]) == [t[S.ACTION][r].as_py() for r in rows[:3]]
        assert bank.lives[k] == t[S.LIVES][rows[3]].as_py() and t[S.ACTION][rows[3]].as_py() != S.NO_ACTION
    with pytest.raises(ValueError, match="no 'val' rows of game 'Pong'|no run of"):
        ContextBank(tiny_split_root, "Pong", "val", n_cond=400, max_contexts=5)


def test_vector_env_batches_games_and_matches_the_agents_wrappers(model_with_heads, tiny_split_root, monkeypatch):
    from ray.rllib.env.wrappers.atari_wrappers import NormalizedImageEnv, WarpFrame

    cfg = _cfg(model_with_heads, tiny_split_root, max_steps=2)
    single = make_imagination_env(dataclasses.asdict(cfg))  # one game through RLlib's own wrappers
    obs1, _ = single.reset(seed=0)
    vec = WorldModelVectorEnv({**dataclasses.asdict(cfg), "num_envs": 3})
    assert vec.single_observation_space == single.observation_space
    calls = []
    predict = vec.games.model.predict
    monkeypatch.setattr(vec.games.model, "predict", lambda c, a, h, generator=None: calls.append(len(c)) or
                        predict(c, a, h, generator=generator))
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, 84, 84, 4) and obs.dtype == np.float32
    assert calls == [3, 3]  # FIRE then action 2 for all three games, each one batched call
    # the newest frame of each stack is RLlib's WarpFrame + NormalizedImageEnv of the game's last frame
    wrapped = NormalizedImageEnv(WarpFrame(single.unwrapped, 84))
    for i in range(3):
        raw = vec.games.frames[i, -1]
        assert np.array_equal(obs[i, ..., -1], wrapped.observation(WarpFrame.observation(wrapped.env, raw))[..., 0])
    assert np.array_equal(agent_frame(vec.games.frames[:, -1], 84)[..., 0], obs[..., -1])
    calls.clear()
    _, r, term, trunc, _ = vec.step(np.array([0, 1, 3]))
    _, r, term, trunc, _ = vec.step(np.array([0, 1, 3]))
    assert calls == [3, 3] and np.all(term | trunc)  # max_steps=2 ends every game
    calls.clear()
    _, r, term, trunc, _ = vec.step(np.array([2, 2, 2]))  # autoreset: fresh contexts, FIRE, nothing counted
    assert not term.any() and not trunc.any() and np.all(r == 0) and (vec.games.steps == 0).all()
    with pytest.raises(ValueError, match=r"expected 3 action"):
        vec.step(np.array([0, 1]))
    with pytest.raises(ValueError, match=r"valid are 0\.\.3"):
        vec.step(np.array([0, 1, 9]))


def test_real_games_are_whole_games_cut_at_the_cap_and_reproducible():
    from pipeline.imagine import bootstrap_mean_ci, play_real_games

    kw = dict(episodes=4, seed=3, repeat_action_probability=0.25, batch=2)
    a = play_real_games("ALE/Breakout-v5", None, max_steps=40, **kw)
    assert np.array_equal(a["lengths"], np.full(4, 40)) and a["truncated"].all()  # random Breakout outlives 40 steps
    b = play_real_games("ALE/Breakout-v5", None, max_steps=5000, **kw)
    # whole games: five lives lost (a random Breakout game runs ~150-250 agent steps), none cut
    assert not b["truncated"].any() and (b["lengths"] > 50).all()
    again = play_real_games("ALE/Breakout-v5", None, max_steps=5000, **kw)
    assert np.array_equal(again["returns"], b["returns"]) and np.array_equal(again["lengths"], b["lengths"])
    lo, hi = bootstrap_mean_ci(np.array([1.0, 2.0, 3.0, 10.0]))
    assert lo < 4.0 < hi and lo >= 1.0 and hi <= 10.0


def test_env_speed_benchmark_prints_a_row_per_setting(model_with_heads, tiny_split_root, tmp_path):
    import pandas as pd

    from benchmarks.bench_env import COLUMNS, BenchEnvConfig, main

    out = tmp_path / "env_speed.csv"
    main(BenchEnvConfig(world_model=model_with_heads, data_root=tiny_split_root, game=GAME, batch_sizes=(1, 2),
                        action_repeats=(2,), heads=("on",), steps=1, device="cpu", out=str(out)))
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS and list(df.batch) == [1, 2] and (df["T"] == 2).all()
    assert (df.steps_per_s > 0).all() and np.allclose(df.frames_per_s, 2 * df.steps_per_s, rtol=0.02)


class _OneLifeLost:
    """Heads that give reward 1 to every transition and a life loss to game 1 on their `on`-th call."""

    def __init__(self, on: int):
        self.on, self.calls = on, 0

    def predict(self, prev, nxt):
        self.calls += 1
        lost = np.zeros(len(prev), bool)
        if self.calls == self.on:
            lost[1] = True
        return np.ones(len(prev), np.float32), lost, np.zeros(len(prev), bool)


def test_vector_env_ends_and_restarts_only_the_game_that_lost_a_life(model_with_heads, tiny_split_root):
    vec = WorldModelVectorEnv({**dataclasses.asdict(_cfg(model_with_heads, tiny_split_root)), "num_envs": 3})
    vec.games.heads = _OneLifeLost(on=3)  # calls 1-2: the reset's FIRE steps; 3: the first step
    obs, _ = vec.reset(seed=1)
    assert all(np.array_equal(obs[i, ..., 0], obs[i, ..., k]) for i in range(3) for k in range(4))  # filled
    lives = vec.games.lives.copy()
    _, r, term, trunc, info = vec.step(np.array([0, 0, 0]))
    assert list(term) == [False, True, False] and not trunc.any() and np.all(r == 1.0)
    assert list(info["lives"]) == [lives[0], lives[1] - 1, lives[2]]
    obs, r, term, trunc, _ = vec.step(np.array([2, 2, 2]))  # game 1 restarts; 0 and 2 go on
    assert list(r) == [1.0, 0.0, 1.0] and not term.any() and not trunc.any()
    assert list(vec.games.steps) == [2, 0, 2]
    assert all(np.array_equal(obs[1, ..., 0], obs[1, ..., k]) for k in range(4))  # a fresh stack


def test_latent_rollout_matches_pixel_rollout_on_its_first_step(tiny_split_root, tmp_path):
    """With a framewise VAE the games carry latents: the first step (real context, no generated
    frame yet) gives the frames `WorldModel.predict` gives, from the same noise; later steps go on
    from the sampled latents and encode nothing."""
    import torch

    from models.stdit import STDiT_models
    from models.vae import VAE_models
    from workers.world_model import save_world_model, world_model_meta

    torch.manual_seed(0)
    vae = VAE_models["tiny"](temporal_kernel=1).eval()
    dit = STDiT_models["tiny"](in_channels=vae.cfg.latent_channels, num_actions=4).eval()
    path = tmp_path / "framewise"
    save_world_model(path, vae, dit, world_model_meta(dit, latent_scale=0.7, n_cond=4, horizon=2, action_mode="future",
                                                      sample_steps=2, trained_horizons=(1, 2)))
    kw = dict(max_steps=50, heads=False)
    fast = WorldModelVectorEnv({**dataclasses.asdict(_cfg(str(path), tiny_split_root, action_repeat=2, **kw)),
                                "num_envs": 2})
    slow = WorldModelVectorEnv({**dataclasses.asdict(_cfg(str(path), tiny_split_root, action_repeat=2,
                                                          latent_rollout=False, **kw)), "num_envs": 2})
    assert fast.games.latents is not None and slow.games.latents is None
    encodes = []
    real_encode = fast.games.model.encode
    fast.games.model.encode = lambda x: encodes.append(len(x)) or real_encode(x)
    for env in (fast, slow):
        env.games.reset_games(np.arange(2))  # the same draws: the RNGs share the config's seed
        env.games.generator.manual_seed(7)
    assert np.array_equal(fast.games.frames, slow.games.frames)
    a, b = fast.games.step(np.array([2, 3])), slow.games.step(np.array([2, 3]))
    diff = np.abs(a["frames"].astype(int) - b["frames"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    fast.games.step(np.array([1, 1]))
    assert encodes == [] and fast.games.latents.shape[1] == 4  # nothing encoded after the contexts
