"""The episode dataset's Parquet schema: every column name and type lives here.

One row per environment step. Row k of an episode holds the frame o_k (raw 210x160 RGB, before
any agent wrapper) and the action a_k taken at it; executing a_k in the emulator gives o_{k+1},
which is row k+1. `reward` is the reward that a_k earned.

The last row of every episode is the frame at which the game stopped (game over, emulator frame
limit, or the end of the collection budget). No action is taken there, so its `action` is
`NO_ACTION` (-1) and its `reward` is 0; `terminated` or `truncated` is set on that row only.
Windows of length n+T never read the action of their last frame (see `workers/clips.py`), so the
sentinel never reaches a model.

Replaying an episode: `gymnasium.make(env_id, **json.loads(env_config))`, `reset(seed=reset_seed)`,
then step the recorded actions of rows 0..N-2; the emulator reproduces rows 1..N-1 bit for bit
(sticky actions are off while recording).

Frames are a Ray Data fixed-shape tensor column (storage `large_list<uint8>` with the shape in the
extension metadata) written with zstd: on Atari screens that is 10-20x smaller than snappy and
than per-frame PNG (figures below and in `benchmarks/bench_collect.py`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

# ---- column names (import these; never spell the strings elsewhere) ----
GAME = "game"
EPISODE_ID = "episode_id"
STEP = "step"
FRAME = "frame"
ACTION = "action"
REWARD = "reward"
TERMINATED = "terminated"
TRUNCATED = "truncated"
LIVES = "lives"
ENV_ID = "env_id"
ENV_CONFIG = "env_config"
RESET_SEED = "reset_seed"
SPLIT = "split"

FRAME_SHAPE = (210, 160, 3)  # (H, W, C) raw ALE screen
NO_ACTION = -1  # action of an episode's last row: no action follows the final frame
SPLITS = ("train", "test")
COMPRESSION = "zstd"
# Measured (benchmarks/bench_collect.py, random-ish play, B/frame): Pong snappy 2936, zstd-1 131,
# zstd-3 129, zstd-9 103, PNG 1628; Breakout 480 / 43 / 43 / 33 / 2069. Level 3 is zstd's default
# speed/size point; level 9 is ~20% smaller if writing ever becomes cheap next to sampling.
COMPRESSION_LEVEL = 3

# Scalar columns and their Arrow types; `frame` is the tensor column and is checked separately.
SCALAR_TYPES: dict[str, pa.DataType] = {
    GAME: pa.string(),
    EPISODE_ID: pa.string(),
    STEP: pa.int32(),
    ACTION: pa.int32(),
    REWARD: pa.float32(),
    TERMINATED: pa.bool_(),
    TRUNCATED: pa.bool_(),
    LIVES: pa.int32(),
    ENV_ID: pa.string(),
    ENV_CONFIG: pa.string(),
    RESET_SEED: pa.int64(),
    SPLIT: pa.string(),
}
COLUMNS = (GAME, EPISODE_ID, STEP, FRAME, ACTION, REWARD, TERMINATED, TRUNCATED, LIVES,
           ENV_ID, ENV_CONFIG, RESET_SEED, SPLIT)


class DatasetError(ValueError):
    """Bad episode data; the message names the file, column, row or value at fault."""


def frames_to_arrow(frames: np.ndarray) -> pa.ExtensionArray:
    """(N, 210, 160, 3) uint8 -> Ray Data tensor column."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8))


def frames_from_arrow(col: pa.Array | pa.ChunkedArray, source: str = "<table>") -> np.ndarray:
    """Tensor (or plain list<uint8>) column -> (N, 210, 160, 3) uint8 without a per-row loop.

    Works on the Ray extension type and on its bare storage (what a reader that never imported
    ray.data sees), because both keep the pixels as one flat uint8 child buffer."""
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)) or col.type.value_type != pa.uint8():
        raise DatasetError(f"{source}: column {FRAME!r} has type {col.type}, expected a uint8 "
                           f"tensor of shape {FRAME_SHAPE}")
    n = len(col)
    per = int(np.prod(FRAME_SHAPE))
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{source}: column {FRAME!r} is null at row {bad}")
    if not pa.types.is_fixed_size_list(col.type):
        lengths = np.diff(col.offsets.to_numpy())
        if n and (lengths != per).any():
            bad = int(np.flatnonzero(lengths != per)[0])
            raise DatasetError(f"{source}: column {FRAME!r} row {bad} holds {lengths[bad]} values, "
                               f"expected a frame of shape {FRAME_SHAPE} ({per} values)")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if flat.size != n * per:
        raise DatasetError(f"{source}: column {FRAME!r} holds {flat.size} values for {n} rows, "
                           f"expected frames of shape {FRAME_SHAPE}")
    return flat.reshape(n, *FRAME_SHAPE)


def split_of(episode_id: str, test_fraction: float) -> str:
    """Deterministic train/test assignment of an episode (a hash, so reruns agree)."""
    h = int.from_bytes(hashlib.sha1(episode_id.encode()).digest()[:8], "little")
    return "test" if (h % 1_000_000) < round(test_fraction * 1_000_000) else "train"


def check_columns(schema: pa.Schema, source: str) -> None:
    """Every column present with its type (extra columns, e.g. hive partitions, are allowed)."""
    names = set(schema.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DatasetError(f"{source}: missing column(s) {missing}; found {sorted(names)}")
    for name, typ in SCALAR_TYPES.items():
        got = schema.field(name).type
        if isinstance(got, pa.DictionaryType):  # hive partition columns read back as dictionaries
            got = got.value_type
        if got != typ and not (pa.types.is_string(typ) and pa.types.is_large_string(got)):
            raise DatasetError(f"{source}: column {name!r} has type {got}, expected {typ}")

