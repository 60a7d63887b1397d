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
(sticky actions are off while recording). Without sticky actions ALE's emulation does not depend
on the seed, so the recorder applies a seed only at each env's first reset (a seeded reset reloads
the ROM) and records for every game the seed that replays it; with sticky actions on, every
reset is seeded (workers/atari.py, RawFrameRecorder).

Frames are a `large_binary` column: each value is one frame's raw 100,800 bytes, row-major
(H, W, C) uint8, and Parquet compresses the column with zstd. Decoding is one zero-copy view of
the column's data buffer (`frames_from_arrow`), never a per-row loop. Measured on 1,024 frames of
random play (benchmarks/bench_collect.py prints the same comparison): writing costs ~0.04 ms a
frame against 2-3.7 ms for the tensor column (`large_list<uint8>`, which Parquet stores with
per-pixel levels and a dictionary), and a frame takes 62-157 B (Pong, Breakout, DemonAttack).
Readers also accept that older tensor layout.
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
SPLITS = ("train", "val", "test")
"""Episode splits: `val` chooses settings and models, `test` is read by a run's final evaluation only."""
COMPRESSION = "zstd"
# Measured on the binary frame column (1,024 frames of random play, B/frame at zstd level 1 / 3 / 6):
# Pong 62 / 79 / 69, Breakout 84 / 116 / 107, DemonAttack 157 / 153 / 87; writing costs
# 0.035 / 0.045 / 0.09 ms a frame. Level 1 keeps writing negligible next to the emulator
# (~0.3 ms a step) while staying far under 1 KB a frame.
COMPRESSION_LEVEL = 1
FRAME_TYPE = pa.large_binary()
FRAME_BYTES = int(np.prod(FRAME_SHAPE))

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


def frames_to_arrow(frames: np.ndarray) -> pa.LargeBinaryArray:
    """(N, ...) uint8 frames -> the `frame` column, one value of raw bytes per frame, built over
    the frames' own buffer (no per-row copy). The schema's frames are (N, 210, 160, 3)."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    n, per = len(frames), int(np.prod(frames.shape[1:]))
    offsets = np.arange(0, (n + 1) * per, per, dtype=np.int64)
    return pa.LargeBinaryArray.from_buffers(FRAME_TYPE, n, [None, pa.py_buffer(offsets),
                                                            pa.py_buffer(frames.reshape(-1))])


def check_frame_type(t: pa.DataType, source: str) -> bool:
    """Raise DatasetError unless `t` is a frame layout readers accept; True for the binary ones."""
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_large_binary(t) or pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and t.value_type == pa.uint8()):
        return False
    raise DatasetError(f"{source}: column {FRAME!r} has type {t}, expected {FRAME_TYPE} "
                       f"(raw uint8 frames of shape {FRAME_SHAPE})")


def frames_from_arrow(col: pa.Array | pa.ChunkedArray, source: str = "<table>") -> np.ndarray:
    """`frame` column -> (N, 210, 160, 3) uint8 without a per-row loop.

    Takes the binary layout (`large_binary`, `binary` or `fixed_size_binary`) and the older tensor
    layout (Ray's tensor extension type or its bare `list<uint8>` storage): both keep the pixels
    as one flat byte buffer, viewed here without copying where the column is one chunk."""
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    t = col.type
    is_binary = check_frame_type(t, source)
    is_list = not is_binary
    n = len(col)
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{source}: column {FRAME!r} is null at row {bad}")
    unit = "bytes" if is_binary else "values"
    if pa.types.is_fixed_size_binary(t) or pa.types.is_fixed_size_list(t):
        size = t.byte_width if is_binary else t.list_size
        lengths = np.full(n, size, np.int64)
    else:
        offsets = _offsets(col)
        lengths = np.diff(offsets)
    if n and (lengths != FRAME_BYTES).any():
        bad = int(np.flatnonzero(lengths != FRAME_BYTES)[0])
        raise DatasetError(f"{source}: column {FRAME!r} row {bad} holds {int(lengths[bad])} {unit}, "
                           f"expected a uint8 frame of shape {FRAME_SHAPE} ({FRAME_BYTES} {unit})")
    if n == 0:
        return np.zeros((0, *FRAME_SHAPE), np.uint8)
    if is_list:
        flat = col.flatten().to_numpy(zero_copy_only=False)
    elif pa.types.is_fixed_size_binary(t):
        flat = np.frombuffer(col.buffers()[1], np.uint8, n * FRAME_BYTES, col.offset * FRAME_BYTES)
    else:  # the values are one run of the data buffer, from the first offset on
        flat = np.frombuffer(col.buffers()[2], np.uint8, n * FRAME_BYTES, int(offsets[0]))
    return flat.reshape(n, *FRAME_SHAPE)


def _offsets(col: pa.Array) -> np.ndarray:
    """The n+1 value offsets of a (large_)binary or (large_)list array, honouring a slice."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return col.offsets.to_numpy()
    dtype = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    return np.frombuffer(col.buffers()[1], dtype, len(col) + 1, col.offset * np.dtype(dtype).itemsize)


EPISODE_ID_PROCESS_SEP = "~"
"""Recorded episode ids end in `~<pid>.<nonce>`, which differs between collections of the same
settings; what precedes it does not (workers/atari.py)."""


def episode_position(episode_id: str) -> str:
    """A recorded game's place in its collection (run, game, seed, runner, env, game number): its id
    up to `EPISODE_ID_PROCESS_SEP`, the same for the game at that place in every collection of the
    same settings. Ids without the separator are their own position."""
    return str(episode_id).split(EPISODE_ID_PROCESS_SEP, 1)[0]


def split_of(episode_id: str, test_fraction: float, val_fraction: float = 0.0) -> str:
    """Deterministic train/val/test assignment of an episode: a hash of its id up to the process
    part (`EPISODE_ID_PROCESS_SEP`), so that a rerun of the same collection settings holds out the
    games at the same positions (runner, env, game number), whichever processes recorded them.
    The hash's lowest `test_fraction` of the range is `test`, the next `val_fraction` is `val`:
    adding a val split leaves every test episode where it was and takes val out of train."""
    key = episode_position(episode_id)
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") % 1_000_000
    test_end = round(test_fraction * 1_000_000)
    if h < test_end:
        return "test"
    return "val" if h < test_end + round(val_fraction * 1_000_000) else "train"


def check_columns(schema: pa.Schema, source: str) -> None:
    """Every column present with its type (extra columns, e.g. hive partitions, are allowed)."""
    names = set(schema.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DatasetError(f"{source}: missing column(s) {missing}; found {sorted(names)}")
    check_frame_type(schema.field(FRAME).type, source)
    for name, typ in SCALAR_TYPES.items():
        got = schema.field(name).type
        if isinstance(got, pa.DictionaryType):  # hive partition columns read back as dictionaries
            got = got.value_type
        if got != typ and not (pa.types.is_string(typ) and pa.types.is_large_string(got)):
            raise DatasetError(f"{source}: column {name!r} has type {got}, expected {typ}")

