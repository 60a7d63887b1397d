"""Real Breakout frames for tests that need pixels but not the collection stage."""

from __future__ import annotations

import numpy as np


def ale_windows(num: int, length: int, seed: int = 0, crop: tuple[slice, slice] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """`num` windows of `length` consecutive frames of Breakout under random actions:
    frames uint8 (num, length, H, W, 3) (210x160, or the `crop`), actions int64 (num, length)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", repeat_action_probability=0.0)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    frames, actions = [], []
    while len(frames) < num * length:
        a = int(rng.integers(4))
        frames.append(obs if crop is None else obs[crop])
        actions.append(a)
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    f = np.stack(frames)
    return f.reshape(num, length, *f.shape[1:]), np.asarray(actions, dtype=np.int64).reshape(num, length)
