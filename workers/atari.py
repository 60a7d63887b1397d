"""Atari env factory for the agent, and the recorder that keeps the raw game.

The stack, innermost first:

    ALE v5 env (rgb, frameskip 4, sticky actions off while recording)
    RawFrameRecorder        <- sees every emulator step, including the ones the wrappers hide
    wrap_atari_for_new_api_stack(frameskip=1)   (grey, resize, noop-reset, episodic life,
                                                 fire-reset, 4-frame stack: the agent's view)

The recorder sits directly on the emulator so that the no-op and FIRE steps issued by the reset
wrappers and the no-op after each lost life are recorded with the actions that produced them:
replaying a recorded episode from its seed needs every emulator step. It opens a new
game-episode only at a real emulator reset, so EpisodicLifeEnv ending an RLlib episode at each
lost life does not split the game. Frame skip is done by ALE itself (v5 default 4), so the
recorded frames are exactly what `reset`/`step` of the plain env return on replay.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import uuid
from dataclasses import asdict, dataclass

import ale_py
import gymnasium as gym
import numpy as np
import pyarrow as pa

from workers import schema as S

gym.register_envs(ale_py)

DEFAULT_GAMES = ("Breakout", "Pong", "DemonAttack", "Boxing")


@functools.cache
def valid_env_ids() -> tuple[str, ...]:
    """All ALE v5 image-observation ids registered by ale_py."""
    return tuple(sorted(k for k in gym.registry
                        if k.startswith("ALE/") and k.endswith("-v5") and "-ram" not in k))


def resolve_env_id(game: str) -> str:
    """'Pong' or 'ALE/Pong-v5' -> 'ALE/Pong-v5'; anything else fails listing the valid ids."""
    env_id = game if game.startswith("ALE/") else f"ALE/{game}-v5"
    if env_id not in valid_env_ids():
        names = ", ".join(game_name(e) for e in valid_env_ids())
        raise ValueError(f"unknown Atari game {game!r}; valid ALE v5 games are: {names}")
    return env_id


def game_name(env_id: str) -> str:
    """'ALE/Pong-v5' -> 'Pong' (the dataset's `game` column and partition key)."""
    return env_id.removeprefix("ALE/").removesuffix("-v5")


@dataclass(frozen=True)
class EnvSettings:
    """Keyword arguments of `gymnasium.make` for the raw emulator; stored per row as JSON."""

    frameskip: int = 4
    """emulator frames per agent step (ALE v5 default)"""
    repeat_action_probability: float = 0.0
    """sticky actions; 0 while recording so the recorded action is the executed one"""
    full_action_space: bool = False
    """False: the game's minimal action set (what `action` indexes)"""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def make_raw_env(env_id: str, settings: EnvSettings) -> gym.Env:
    """The plain emulator as recorded and as replayed."""
    return gym.make(env_id, obs_type="rgb", **asdict(settings))


@functools.cache
def num_actions(env_id: str, env_config: str) -> int:
    """Size of the action space an `env_id` + `env_config` JSON pair records actions in."""
    env = gym.make(env_id, obs_type="rgb", **json.loads(env_config))
    n = int(env.action_space.n)
    env.close()
    return n


@functools.cache
def action_meanings(env_id: str, env_config: str) -> tuple[str, ...]:
    """ALE's name of each action id ("NOOP", "FIRE", "RIGHT", ...) of an `env_id` + settings pair."""
    env = gym.make(env_id, obs_type="rgb", **json.loads(env_config))
    names = tuple(env.unwrapped.get_action_meanings())
    env.close()
    return names


_instances = itertools.count()  # recorders built in this process; part of the episode ids


class RawFrameRecorder(gym.Wrapper):
    """Records (frame, action, reward, ...) rows of whole games; `drain()` hands them out.

    A row is emitted once its action is known (or the game stopped), so drained rows are final.
    `flush_open()` closes a game cut by the end of collection (last row truncated, no action)."""

    def __init__(self, env: gym.Env, *, env_id: str, settings: EnvSettings, run_id: str,
                 seed: int, worker_index: int, test_fraction: float,
                 val_fraction: float = 0.0):
        super().__init__(env)
        self.env_id, self.game = env_id, game_name(env_id)
        self.env_config = settings.to_json()
        # A seeded ALE reset reloads the ROM (~90 ms, against ~5 ms unseeded: as long as a few
        # hundred steps of emulation). Without sticky actions the emulator does not depend on the
        # seed or on earlier games (checked on 12 games; every recorded game is replayed bit for
        # bit in tests/test_collect.py), so only the first reset of this env is seeded for real
        # and later games record the seed that replays them. With sticky actions every reset is
        # seeded, since the seed then drives the emulator's action repeats.
        self._reseed_every_game = settings.repeat_action_probability > 0
        self._seeded = False
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        # Seeds for resets nobody seeded (RLlib autoresets): drawn here so every game has one.
        instance = next(_instances)
        self._rng = np.random.default_rng([seed, worker_index, instance])
        # `<run>.<game>.s<seed>.w<worker>.<env>.<game number>~<pid>.<nonce>`. The part before "~"
        # is the same in every collection of the same settings, and the train/val/test split hashes
        # that part alone (schema.split_of): a rerun holds out the games at the same positions
        # (runner, env, game number), the same games where the collection replays. The part after it
        # keeps ids unique across processes, and when RLlib restarts a crashed runner in the same run.
        self._prefix = f"{run_id}.{self.game}.s{seed}.w{worker_index}.{instance}"
        self._suffix = f"{S.EPISODE_ID_PROCESS_SEP}{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._games = itertools.count()
        self._rows: dict[str, list] = {k: [] for k in
                                       (S.EPISODE_ID, S.STEP, S.FRAME, S.ACTION, S.REWARD,
                                        S.TERMINATED, S.TRUNCATED, S.LIVES, S.RESET_SEED, S.SPLIT)}
        self._open: dict | None = None  # the running game: id, seed, split, step, frame, lives, return
        self.finished_returns: list[float] = []  # returns of games closed since the last drain
        self.steps_recorded = 0

    # -- gymnasium API --
    def reset(self, *, seed=None, options=None):
        if self._open is not None:  # reset before game over (e.g. a forced reset): cut it here
            self._close(terminated=False, truncated=True)
        explicit = seed is not None
        if seed is None:
            seed = int(self._rng.integers(0, 2**31 - 1))
        apply = explicit or self._reseed_every_game or not self._seeded
        obs, info = self.env.reset(seed=seed if apply else None, options=options)
        self._seeded = True
        eid = f"{self._prefix}.{next(self._games)}{self._suffix}"
        self._open = dict(id=eid, seed=seed, split=S.split_of(eid, self.test_fraction, self.val_fraction), step=0,
                          frame=obs, lives=self._lives(), ret=0.0)
        return obs, info

    def step(self, action):
        g = self._open
        if g is None:
            raise RuntimeError("RawFrameRecorder.step called before reset (or after game over)")
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._emit(g, int(action), float(reward), False, False)
        g.update(step=g["step"] + 1, frame=obs, lives=self._lives(), ret=g["ret"] + float(reward))
        if terminated or truncated:
            self._close(terminated=bool(terminated), truncated=bool(truncated))
            # EpisodicLifeEnv only really resets after `terminated`; report an emulator time-limit
            # as terminated so the next reset starts a fresh, recorded game (the row keeps
            # truncated=True, which is what replay and analysis need).
            terminated, truncated = True, False
        return obs, reward, terminated, truncated, info

    # -- recording --
    def _lives(self) -> int:
        return int(self.env.unwrapped.ale.lives())

    def _emit(self, g: dict, action: int, reward: float, terminated: bool, truncated: bool):
        r = self._rows
        r[S.EPISODE_ID].append(g["id"]); r[S.STEP].append(g["step"]); r[S.FRAME].append(g["frame"])
        r[S.ACTION].append(action); r[S.REWARD].append(reward); r[S.TERMINATED].append(terminated)
        r[S.TRUNCATED].append(truncated); r[S.LIVES].append(g["lives"])
        r[S.RESET_SEED].append(g["seed"]); r[S.SPLIT].append(g["split"])
        self.steps_recorded += 1

    def _close(self, *, terminated: bool, truncated: bool):
        g, self._open = self._open, None
        self._emit(g, S.NO_ACTION, 0.0, terminated, truncated)
        self.finished_returns.append(g["ret"])

    def flush_open(self):
        """End of collection: the running game becomes a truncated episode."""
        if self._open is not None:
            self._close(terminated=False, truncated=True)

    def drain(self) -> pa.Table:
        """Rows recorded since the last drain, as an Arrow table in the dataset schema."""
        r = self._rows
        n = len(r[S.STEP])
        frames = np.stack(r[S.FRAME]) if n else np.zeros((0, *S.FRAME_SHAPE), np.uint8)
        cols = {
            S.GAME: pa.array([self.game] * n, S.SCALAR_TYPES[S.GAME]),
            S.EPISODE_ID: pa.array(r[S.EPISODE_ID], pa.string()),
            S.STEP: pa.array(r[S.STEP], pa.int32()),
            S.FRAME: S.frames_to_arrow(frames),
            S.ACTION: pa.array(r[S.ACTION], pa.int32()),
            S.REWARD: pa.array(r[S.REWARD], pa.float32()),
            S.TERMINATED: pa.array(r[S.TERMINATED], pa.bool_()),
            S.TRUNCATED: pa.array(r[S.TRUNCATED], pa.bool_()),
            S.LIVES: pa.array(r[S.LIVES], pa.int32()),
            S.ENV_ID: pa.array([self.env_id] * n, pa.string()),
            S.ENV_CONFIG: pa.array([self.env_config] * n, pa.string()),
            S.RESET_SEED: pa.array(r[S.RESET_SEED], pa.int64()),
            S.SPLIT: pa.array(r[S.SPLIT], pa.string()),
        }
        for v in r.values():
            v.clear()
        return pa.table([cols[c] for c in S.COLUMNS], names=list(S.COLUMNS))


def make_atari_env(env_config: dict) -> gym.Env:
    """RLlib env creator (module level so env runners can unpickle it).

    env_config keys: env_id, settings (EnvSettings as dict), dim, framestack, and, when
    recording, record=True with run_id, seed, test_fraction (and val_fraction). `worker_index` comes from RLlib's
    EnvContext when present."""
    settings = EnvSettings(**env_config["settings"])
    env = make_raw_env(env_config["env_id"], settings)
    if env_config.get("record", False):
        env = RawFrameRecorder(env, env_id=env_config["env_id"], settings=settings,
                               run_id=env_config["run_id"], seed=env_config["seed"],
                               worker_index=getattr(env_config, "worker_index", 0),
                               test_fraction=env_config["test_fraction"],
                               val_fraction=env_config.get("val_fraction", 0.0))
    # frameskip=1: ALE already skips 4 frames; a second skip would desynchronise recorder and agent
    from ray.rllib.env.wrappers.atari_wrappers import wrap_atari_for_new_api_stack
    return wrap_atari_for_new_api_stack(env, dim=env_config["dim"], frameskip=1,
                                        framestack=env_config["framestack"])


def find_recorder(env: gym.Env) -> RawFrameRecorder:
    """The recorder inside one (non-vector) wrapped env."""
    e = env
    while not isinstance(e, RawFrameRecorder):
        if not hasattr(e, "env"):
            raise TypeError(f"no RawFrameRecorder in {env}")
        e = e.env
    return e
