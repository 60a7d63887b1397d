"""The world model as an RL environment: an agent acts inside imagined games.

Three layers, innermost first:

- `ImaginedGames`: B imagined games stepped together. Each starts from a real context (n_cond
  consecutive frames, the actions between them and the lives shown) drawn from the training split
  by a seeded RNG (`ContextBank`); a step generates the next `action_repeat` frames of every game in
  one `WorldModel.predict` call (one chunk of T frames with the action repeated: the multi-frame
  generation this project is about; T = 1 is frame by frame), then reads reward, life loss and game
  over of each generated transition with the reward/termination heads (`workers/reward_model.py`,
  saved in the world-model folder under `heads/`).
- `WorldModelEnv`, a `gymnasium.Env` of one game, raw 210x160 RGB like ALE's `obs_type="rgb"`.
  It answers `unwrapped.ale.lives()` and `unwrapped.get_action_meanings()` as ALE does, so RLlib's
  own Atari wrappers run on it unchanged (`wrap_agent_view`).
- `WorldModelVectorEnv`, a `gymnasium.vector.VectorEnv` of N games batched on one device, with the
  agent's view built in (the same grey 84x84 resize, scaling and frame stack as RLlib's wrappers
  on real play, vectorised): what RLlib's env runners hold (`gym_env_vectorize_mode=
  "vector_entry_point"`), so one forward pass of the world model serves all their games.

An imagined episode ends (`terminated`) at a predicted life loss or game over, and is truncated
after `max_steps` agent steps. Ending at a life loss is what RLlib's EpisodicLifeEnv does on real
play; in imagination the next reset draws a fresh real context instead of continuing, so the agent
also sees the states after lost lives, since real play recorded them. The real game's 30 no-op
resets are left out: the drawn contexts already vary the start.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from models.action_encoder import first_action_frame
from workers import schema as S

ENV_NAME = "awm-imagination"
"""The name `register_imagination_env` gives the env in Ray Tune's registry (RLlib's `env=`)."""


@dataclass(frozen=True)
class ImaginationConfig:
    """What an imagined game is made of (the env_config of the registered env, as a dict)."""

    world_model: str = ""
    """World-model folder (`workers/world_model.py`), with the reward/termination heads in `heads/`."""
    data_root: str = ""
    """Episode dataset whose `split` episodes give the starting contexts."""
    game: str = ""
    """Game of the contexts (e.g. "Breakout"); must be the one the world model was trained on."""
    split: str = "train"
    """Split of the starting contexts: the agent never starts from a held-out episode."""
    max_contexts: int = 256
    """Starting contexts read into memory (a seeded subset of all; 4 frames are ~400 KB each)."""
    action_repeat: int = 1
    """Frames generated per agent step, with the action repeated; rewards of those frames are summed.
    A generation length the model was trained for is one chunk; another is generated as
    `WorldModel.predict` does (chunks of the longest trained length, extra frames dropped)."""
    max_steps: int = 1000
    """Agent steps after which an imagined episode is truncated (the imagination horizon)."""
    sample_steps: int = 0
    """Euler steps of generation; 0 = the model's own setting."""
    heads: bool = True
    """Read reward and termination with the heads; False gives reward 0 and no ending (speed tests)."""
    latent_rollout: bool = True
    """With a framewise VAE and a trained chunk length, carry each game's condition latents from step
    to step (generated latents as sampled, not re-encoded from their pixels): a step encodes nothing
    and decodes only its new frames. False: every step runs `WorldModel.predict` on pixels."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda when this process sees a GPU)."""
    seed: int = 0
    """Seeds the context draws and the generation noise (with the reset seed, when one is given)."""
    dim: int = 84
    """Vector env: the agent's square grey observation size (as AgentConfig.dim)."""
    framestack: int = 4
    """Vector env: frames stacked in the agent's observation (as AgentConfig.framestack)."""

    def __post_init__(self) -> None:
        if self.split not in S.SPLITS:
            raise ValueError(f"ImaginationConfig.split={self.split!r}; expected one of {S.SPLITS}")
        for name in ("max_contexts", "action_repeat", "max_steps", "dim", "framestack"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImaginationConfig.{name}={getattr(self, name)}; must be >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"ImaginationConfig.device={self.device!r}; expected 'cpu', 'cuda' or 'auto'")

    @classmethod
    def from_env_config(cls, env_config: dict) -> "ImaginationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(env_config) - names - {"num_envs"}
        if unknown:
            raise ValueError(f"imagination env_config: unknown keys {sorted(unknown)}; valid are {sorted(names)}")
        return cls(**{k: v for k, v in dict(env_config).items() if k in names})


class ContextBank:
    """Real starting contexts of one game and split: `n_cond` consecutive frames whose last one is
    followed by an action (not an episode's final frame), with the `n_cond - 1` actions between them
    and the lives shown at the last one. Reads the small columns of every file, then frames only of
    the rows kept."""

    def __init__(self, data_root: str, game: str, split: str, n_cond: int, max_contexts: int, seed: int = 0):
        from workers.inverse_dynamics import _split_rows, read_frames

        r = _split_rows(data_root, game, split, extra=(S.LIVES,))
        if not len(r["eid"]):
            raise ValueError(f"no {split!r} rows of game {game!r} under data_root {data_root!r}: "
                             f"the imagination env draws its starting contexts from them")
        order = np.lexsort((r["step"], r["eid"]))
        eid, step, action = r["eid"][order], r["step"][order], r["action"][order]
        n, m = n_cond, len(order) - n_cond + 1
        # a start s is valid when rows s..s+n-1 are consecutive steps of one episode and row s+n-1 has an action
        ok = np.ones(max(m, 0), bool)
        for k in range(1, n):
            ok &= (eid[k:m + k] == eid[:m]) & (step[k:m + k] == step[:m] + k)
        ok &= action[n - 1:] != S.NO_ACTION
        starts = np.flatnonzero(ok)
        if not len(starts):
            raise ValueError(f"no run of {n} consecutive frames in the {split!r} episodes of {game!r} under "
                             f"{data_root!r}")
        if len(starts) > max_contexts:
            starts = np.sort(np.random.default_rng(seed).choice(starts, max_contexts, replace=False))
        idx = starts[:, None] + np.arange(n)  # (K, n) positions in the sorted order
        src = order[idx]  # (K, n) rows of r
        self.frames = read_frames(r, src.reshape(-1))[0].reshape(len(starts), n, *S.FRAME_SHAPE)
        self.past_actions = action[idx[:, :-1]]  # (K, n-1): a_{t-n+1}..a_{t-1}
        self.lives = r[S.LIVES][src[:, -1]].astype(np.int64)  # (K,) lives shown at the last frame
        self.keys = [(str(e), int(s)) for e, s in zip(eid[starts], step[starts])]
        self.env_id, self.env_config = str(r["env"][0]).split("\x1f", 1)

    def __len__(self) -> int:
        return len(self.frames)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("ImaginationConfig.device='cuda' but this process sees no GPU (use 'auto')")
    return torch.device(name)


class ImaginedGames:
    """B imagined games of one world model, stepped together (see the module docstring)."""

    def __init__(self, cfg: ImaginationConfig, num_games: int):
        from workers.atari import action_meanings
        from workers.world_model import load_world_model

        if not cfg.world_model or not cfg.data_root or not cfg.game:
            raise ValueError("ImaginationConfig needs world_model, data_root and game")
        self.cfg, self.num_games = cfg, num_games
        device = _device(cfg.device)
        self.model = load_world_model(cfg.world_model, map_location=device, sample_steps=cfg.sample_steps or None)
        self.heads = None
        if cfg.heads:
            from workers.reward_model import load_heads

            self.heads = load_heads(cfg.world_model, device=str(device))
        self.n_cond = self.model.n_cond
        self.bank = ContextBank(cfg.data_root, cfg.game, cfg.split, self.n_cond, cfg.max_contexts, cfg.seed)
        self.action_meanings = action_meanings(self.bank.env_id, self.bank.env_config)
        self.num_actions = len(self.action_meanings)  # the game's action set, as the dataset recorded it
        if self.num_actions > int(self.model.dit.cfg.num_actions):
            raise ValueError(f"the world model encodes {self.model.dit.cfg.num_actions} actions, fewer than the "
                             f"{self.num_actions} of {cfg.game!r} in the dataset: another game's model?")
        n = self.n_cond
        self.frames = np.zeros((num_games, n, *S.FRAME_SHAPE), np.uint8)  # the last n frames of each game
        self.past = np.zeros((num_games, n - 1), np.int64)  # the actions between them
        self.lives = np.zeros(num_games, np.int64)
        self.steps = np.zeros(num_games, np.int64)
        self.context = np.zeros(num_games, np.int64)  # the bank index each game started from
        self.rng = np.random.default_rng(cfg.seed)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # A framewise VAE lets the games carry their condition latents: a step then encodes nothing
        # and decodes only its new frames (the contexts are encoded once, here).
        self.latents: torch.Tensor | None = None
        if cfg.latent_rollout and self.model.framewise and cfg.action_repeat in self.model.trained_horizons:
            with torch.no_grad():
                enc = [self.model.encode(torch.from_numpy(self.bank.frames[i: i + 64]))
                       for i in range(0, len(self.bank), 64)]
            self.bank_latents = torch.cat(enc)  # (K, n, C, h, w) scaled, on the model's device
            self.latents = torch.zeros(num_games, *self.bank_latents.shape[1:], device=self.bank_latents.device,
                                       dtype=self.bank_latents.dtype)
        # cumulative seconds of generation and of the heads, and frames generated (benchmarks)
        self.seconds = {"generate": 0.0, "heads": 0.0}
        self.frames_generated = 0

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.generator.manual_seed(int(seed))

    def reset_games(self, which: np.ndarray, rng: np.random.Generator | None = None) -> None:
        """Start the games `which` (indices) from freshly drawn contexts."""
        pick = (rng or self.rng).integers(0, len(self.bank), len(which))
        self.frames[which] = self.bank.frames[pick]
        self.past[which] = self.bank.past_actions[pick]
        self.lives[which] = self.bank.lives[pick]
        self.steps[which] = 0
        self.context[which] = pick
        if self.latents is not None:
            self.latents[torch.as_tensor(which, device=self.latents.device)] = \
                self.bank_latents[torch.as_tensor(pick, device=self.latents.device)]

    def check_actions(self, actions: Any, count: int | None = None) -> np.ndarray:
        """`actions` as int64 (count,), or a TypeError/ValueError naming the valid action set."""
        count = self.num_games if count is None else count
        a = np.asarray(actions)
        if a.dtype.kind not in "iu":
            raise TypeError(f"actions must be integers of the game's action set 0..{self.num_actions - 1}, "
                            f"got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        if a.shape != (count,):
            raise ValueError(f"expected {count} action(s), got shape {np.shape(actions)}")
        bad = (a < 0) | (a >= self.num_actions)
        if bad.any():
            raise ValueError(f"action {int(a[bad][0])} is outside the game's action set: valid are "
                             f"0..{self.num_actions - 1} ({', '.join(self.action_meanings)})")
        return a

    def step(self, actions: Any, which: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The games `which` (default all) one agent step each: `action_repeat` frames generated in
        one chunk. Returns the new frames (b, T, 210, 160, 3) uint8, reward (b,) summed over them,
        life_lost and game_over (b,), for those games in that order."""
        which = np.arange(self.num_games) if which is None else np.asarray(which)
        a = self.check_actions(actions, len(which))
        T = self.cfg.action_repeat
        future = np.repeat(a[:, None], T, axis=1)
        frames, past = self.frames[which], self.past[which]
        # the mode's past actions (none for "future") then the future ones: models.action_encoder's rule
        acts = np.concatenate([past[:, first_action_frame(self.n_cond, self.model.action_mode):], future], axis=1)
        t0 = time.perf_counter()
        if self.latents is not None:
            idx = torch.as_tensor(which, device=self.latents.device)
            z_new, pix = self.model.chunk_from_latents(self.latents[idx], torch.from_numpy(acts), T,
                                                       S.FRAME_SHAPE[:2], generator=self.generator)
            self.latents[idx] = torch.cat([self.latents[idx], z_new], dim=1)[:, -self.n_cond:]
            new = pix.cpu().numpy()  # (b, T, H, W, 3)
        else:
            new = self.model.predict(torch.from_numpy(frames), torch.from_numpy(acts), T,
                                     generator=self.generator).numpy()  # (b, T, H, W, 3)
        t1 = time.perf_counter()
        self.seconds["generate"] += t1 - t0
        self.frames_generated += new.shape[0] * T
        b = len(which)
        reward, life_lost, game_over = np.zeros(b, np.float32), np.zeros(b, bool), np.zeros(b, bool)
        if self.heads is not None:
            prev = np.concatenate([frames[:, -1:], new[:, :-1]], axis=1)  # the frame before each new one
            r, ll, go = self.heads.predict(prev.reshape(-1, *S.FRAME_SHAPE), new.reshape(-1, *S.FRAME_SHAPE))
            ends = (np.asarray(ll, bool) | np.asarray(go, bool)).reshape(b, T)
            after_end = (np.cumsum(ends, axis=1) - ends) > 0  # frames after the chunk's first ending
            reward = np.where(after_end, 0.0, np.asarray(r, np.float32).reshape(b, T)).sum(1).astype(np.float32)
            life_lost = np.asarray(ll, bool).reshape(b, T).any(1)
            game_over = np.asarray(go, bool).reshape(b, T).any(1)
            self.seconds["heads"] += time.perf_counter() - t1
        self.frames[which] = np.concatenate([frames, new], axis=1)[:, -self.n_cond:]
        if self.n_cond > 1:
            self.past[which] = np.concatenate([past, future], axis=1)[:, -(self.n_cond - 1):]
        self.lives[which] = np.where(life_lost, np.maximum(self.lives[which] - 1, 0), self.lives[which])
        self.steps[which] += 1
        return {"frames": new, "reward": reward, "life_lost": life_lost, "game_over": game_over}


class _Lives:
    """`env.unwrapped.ale` of an imagined game: RLlib's EpisodicLifeEnv reads `ale.lives()`."""

    def __init__(self, env: "WorldModelEnv"):
        self._env = env

    def lives(self) -> int:
        return int(self._env.games.lives[0])


class WorldModelEnv(gym.Env):
    """One imagined game: raw RGB (210, 160, 3) uint8 observations, the game's minimal action set.

    `reset` draws a real context (its last frame is the first observation); `step(action)` returns
    the last generated frame, the reward of the step (summed over `action_repeat` frames),
    `terminated` at a predicted life loss or game over and `truncated` after `max_steps` steps.
    `info` carries `lives` and, after reset, the context's (episode_id, step)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, cfg: ImaginationConfig | dict, render_mode: str | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, ImaginationConfig) else ImaginationConfig.from_env_config(cfg)
        self.games = ImaginedGames(self.cfg, 1)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, S.FRAME_SHAPE, np.uint8)
        self.action_space = gym.spaces.Discrete(self.games.num_actions)
        self.ale = _Lives(self)
        self._started = False
        self._seeded = False

    def get_action_meanings(self) -> list[str]:
        return list(self.games.action_meanings)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None and not self._seeded:
            seed = self.cfg.seed  # the first reset follows the config's seed: runs repeat
        self._seeded = True
        super().reset(seed=seed)
        if seed is not None:
            self.games.generator.manual_seed(int(seed))
        self.games.reset_games(np.array([0]), self.np_random)
        self._started = True
        g = self.games
        return g.frames[0, -1].copy(), {"lives": int(g.lives[0]), "context": g.bank.keys[int(g.context[0])]}

    def step(self, action):
        if not self._started:
            raise RuntimeError("WorldModelEnv.step called before reset")
        if isinstance(action, (np.ndarray, list, tuple)) and np.ndim(action) != 0:
            raise ValueError(f"WorldModelEnv.step takes one action (an int in 0..{self.games.num_actions - 1}), "
                             f"got shape {np.shape(action)}")
        out = self.games.step(np.asarray([action]))
        terminated = bool(out["life_lost"][0] or out["game_over"][0])
        truncated = bool(self.games.steps[0] >= self.cfg.max_steps) and not terminated
        if terminated or truncated:
            self._started = False
        info = {"lives": int(self.games.lives[0]), "game_over": bool(out["game_over"][0])}
        return out["frames"][0, -1].copy(), float(out["reward"][0]), terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.games.frames[0, -1].copy()
        return None


def wrap_agent_view(env: gym.Env, dim: int = 84, framestack: int = 4) -> gym.Env:
    """The agent's view of a single imagined game with RLlib's own wrappers, as on real play
    (workers/atari.py) minus the no-op resets and the per-life episodes (see the module docstring)."""
    from ray.rllib.env.wrappers.atari_wrappers import FireResetEnv, FrameStack, NormalizedImageEnv, WarpFrame

    class FireReset(FireResetEnv):
        """RLlib's FireResetEnv; its two steps start the game and count toward no horizon."""

        def reset(self, **kwargs):
            obs, info = super().reset(**kwargs)
            self.env.unwrapped.games.steps[:] = 0
            return obs, info

    env = WarpFrame(env, dim=dim, grayscale=True)
    env = NormalizedImageEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    return FrameStack(env, k=framestack)


def agent_frame(frames: np.ndarray, dim: int) -> np.ndarray:
    """Raw frames (N, 210, 160, 3) uint8 -> the agent's grey frames (N, dim, dim, 1) float32 in
    [-1, 1): RLlib's WarpFrame (its rgb2gray and resize) then NormalizedImageEnv, frame by frame."""
    from ray.rllib.utils.images import resize, rgb2gray

    out = np.stack([resize(rgb2gray(f), height=dim, width=dim) for f in frames])[..., None]
    return out.astype(np.float32) / 128.0 - 1.0


class WorldModelVectorEnv(gym.vector.VectorEnv):
    """N imagined games batched in one world-model call per step, observed the agent's way: grey
    (dim, dim, framestack) float32 stacks, as `wrap_agent_view` gives for one game.

    Autoreset follows gymnasium's default (next step): the step after a game ends resets it,
    ignores its action and returns its first observation with reward 0. A reset presses FIRE and
    then action 2 for games that have FIRE (RLlib's FireResetEnv)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, cfg: ImaginationConfig | dict, num_envs: int = 1):
        if isinstance(cfg, dict):
            num_envs = int(cfg.get("num_envs", num_envs))
            cfg = ImaginationConfig.from_env_config(cfg)
        self.cfg, self.num_envs = cfg, num_envs
        self.games = ImaginedGames(cfg, num_envs)
        self.fire = "FIRE" in self.games.action_meanings[1:2] and len(self.games.action_meanings) >= 3
        k, d = cfg.framestack, cfg.dim
        self.single_observation_space = gym.spaces.Box(-1.0, 1.0, (d, d, k), np.float32)
        self.single_action_space = gym.spaces.Discrete(self.games.num_actions)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._stack = np.zeros((num_envs, d, d, k), np.float32)
        self._done = np.zeros(num_envs, bool)

    def _push(self, which: np.ndarray, frames: np.ndarray, fill: bool = False) -> None:
        g = agent_frame(frames, self.cfg.dim)  # (len(which), d, d, 1)
        if fill:
            self._stack[which] = np.repeat(g, self.cfg.framestack, axis=-1)
        else:
            self._stack[which] = np.concatenate([self._stack[which, ..., 1:], g], axis=-1)

    def _start(self, which: np.ndarray) -> None:
        """Fresh contexts for the games `which`, then FIRE and action 2 where the game has FIRE
        (only the games being started take those steps, in one batched call each), then their
        stacks filled with the resulting frame, as FireResetEnv under FrameStack does."""
        g = self.games
        g.reset_games(which)
        if self.fire:
            for a in (1, 2):
                out = g.step(np.full(len(which), a), which)
                ended = which[out["life_lost"] | out["game_over"]]
                if len(ended):  # as FireResetEnv: a start that ended is started again
                    g.reset_games(ended)
            g.steps[which] = 0
        self._push(which, g.frames[which, -1], fill=True)  # as FrameStack: the first observation k times

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.games.seed(seed)
        self._start(np.arange(self.num_envs))
        self._done[:] = False
        return self._stack.copy(), {"lives": self.games.lives.copy()}

    def step(self, actions):
        a = self.games.check_actions(actions)
        restart = np.flatnonzero(self._done)
        a = np.where(self._done, 0, a)
        out = self.games.step(a)
        self._push(np.arange(self.num_envs), out["frames"][:, -1])
        reward = out["reward"].astype(np.float32)
        terminated = out["life_lost"] | out["game_over"]
        truncated = (self.games.steps >= self.cfg.max_steps) & ~terminated
        if len(restart):  # autoreset: these games start again; their step counts nothing
            self._start(restart)
            reward[restart], terminated[restart], truncated[restart] = 0.0, False, False
        self._done = terminated | truncated
        return self._stack.copy(), reward, terminated, truncated, {"lives": self.games.lives.copy()}


def make_imagination_env(env_config: dict) -> gym.Env | gym.vector.VectorEnv:
    """RLlib env creator: with `num_envs` in env_config (RLlib's vector entry point) the batched
    vector env, else one game with the agent's view (`wrap_agent_view`)."""
    if "num_envs" in env_config:
        return WorldModelVectorEnv(dict(env_config))
    cfg = ImaginationConfig.from_env_config(dict(env_config))
    return wrap_agent_view(WorldModelEnv(cfg), cfg.dim, cfg.framestack)


def register_imagination_env() -> str:
    """Register `make_imagination_env` with Ray Tune under ENV_NAME (call it in every process that
    builds an RLlib config); returns the name."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_imagination_env)
    return ENV_NAME
