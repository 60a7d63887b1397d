"""Clip windows over the episode dataset (Ray Data), and the split of a window into a sample.

A window is L consecutive steps of one episode: windows start at steps 0, s, 2s, ... while the
whole window fits, so an episode shorter than L gives none and the tail after the last start
that fits is not covered. No window crosses an episode boundary: windows are cut per episode
after grouping by `episode_id`, with numpy fancy indexing over the whole episode.

The last frame of an episode carries `action == -1` (no action follows it; workers/schema.py).
`split_sample` never reads the action of a window's last frame, so with L = n+T the sentinel
never reaches a model; with longer windows (VAE training) actions are not used.
"""

from __future__ import annotations

import os
import zlib
from typing import Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.action_encoder import ACTION_MODES, window_action_slice
from workers import schema as S
from workers.atari import num_actions

# iter_torch_batches converts every column to a tensor and rejects strings: select these first,
# `window_dataset(...).select_columns(list(TENSOR_COLUMNS)).iter_torch_batches(...)`.
TENSOR_COLUMNS = ("frames", "actions", "start_step")
_WINDOW_BYTES = 64 << 20  # output batch size bound: windows repeat frames L/stride times
_READ_COLUMNS = [S.EPISODE_ID, S.STEP, S.FRAME, S.ACTION, S.ENV_ID, S.ENV_CONFIG, S.SPLIT]


def parquet_files(path: str) -> list[str]:
    """Every Parquet file under a dataset root (or its `episodes/` folder), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no episode dataset at {path}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.endswith(".parquet") and "/.staging" not in d)
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


def read_episodes(path: str, columns: list[str] | None = None):
    """The episode dataset as a Ray Dataset (file columns only; the hive path is ignored because
    `game` is stored in the files and partition inference would clash with it)."""
    import ray

    return ray.data.read_parquet(parquet_files(path), columns=columns, partitioning=None)


def _check_actions(actions: np.ndarray, env_id: str, env_config: str, where: str) -> None:
    n = num_actions(env_id, env_config)
    bad = (actions < S.NO_ACTION) | (actions >= n)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise S.DatasetError(f"{where}: action {int(actions[i])} at row {i} is outside {env_id}'s "
                             f"action space [0, {n}) (or -1 on an episode's last row)")


def _windows_of_episode(batch: pa.Table, length: int, stride: int, split: str | None = None,
                        game: str | None = None, episodes: frozenset | None = None) -> Iterator[dict]:
    """map_groups UDF: one episode's rows (an Arrow table) -> batches of windows (none for an episode
    of another split than `split`, another game than `game`, or outside `episodes`, when given)."""
    eid = str(batch[S.EPISODE_ID][0].as_py())
    if episodes is not None and eid not in episodes:
        return
    if split is not None and str(batch[S.SPLIT][0].as_py()) != split:
        return
    if game is not None and str(batch[S.GAME][0].as_py()) != game:
        return
    # Rows arrive in any order (an episode may span files). Only the small columns are sorted by
    # step; the frames stay a view of the batch, read through `order` when windows are cut.
    order = np.argsort(batch[S.STEP].to_numpy(), kind="stable")
    steps = batch[S.STEP].to_numpy()[order]
    if (np.diff(steps) != 1).any() or steps[0] != 0:
        i = int(np.flatnonzero(np.diff(steps) != 1)[0]) if (np.diff(steps) != 1).any() else 0
        raise S.DatasetError(f"episode {eid}: steps are not contiguous from 0 (around step "
                             f"{int(steps[i])}); duplicated or missing rows")
    try:
        frames = S.frames_from_arrow(batch[S.FRAME])  # (N, 210, 160, 3), arrival order
    except S.DatasetError:  # decode again in step order, so that the error names the step
        S.frames_from_arrow(batch[S.FRAME].take(order), f"episode {eid} (rows = steps)")
        raise
    actions = batch[S.ACTION].to_numpy()[order].astype(np.int64)
    _check_actions(actions, batch[S.ENV_ID][0].as_py(), batch[S.ENV_CONFIG][0].as_py(), f"episode {eid}")
    starts = np.arange(0, len(steps) - length + 1, stride)  # (W,)
    per = max(1, _WINDOW_BYTES // (length * frames[0].nbytes))
    for c in range(0, len(starts), per):
        idx = starts[c:c + per, None] + np.arange(length)  # (W, L) row indices
        yield {"frames": frames[order[idx]],  # (W, L, 210, 160, 3)
               "actions": actions[idx],  # (W, L)
               "episode_id": np.full(len(idx), eid, dtype=object),
               "start_step": steps[idx[:, 0]].astype(np.int64)}


def episode_share_mask(episode_ids: pa.Array | pa.ChunkedArray, share: float) -> pa.Array:
    """Which rows belong to the fixed `share` of episodes: an episode is in when the CRC-32 of its
    id, taken modulo 10,000, is below share x 10,000. Whole episodes, the same ones in every call
    and every process (no per-process hash seed)."""
    uniq = pc.unique(episode_ids).to_pylist()
    keep = [e for e in uniq if zlib.crc32(str(e).encode()) % 10_000 < share * 10_000]
    return pc.is_in(episode_ids, value_set=pa.array(keep, type=episode_ids.type))


def keep_episode_share(ds, share: float):
    """The rows (or windows) of a Ray Dataset with an `episode_id` column whose episode is in the
    fixed `share` of episodes (`episode_share_mask`); the dataset itself when share is 1."""
    if share >= 1.0:
        return ds
    if share <= 0.0:
        raise ValueError(f"episode share must be in (0, 1], got {share}")
    return ds.map_batches(lambda t: t.filter(episode_share_mask(t[S.EPISODE_ID], share)),
                          batch_format="pyarrow", batch_size=None)


def window_dataset(ds_or_path, length: int = 32, stride: int = 4, split: str | None = None,
                   num_partitions: int | None = None, episodes=None, game: str | None = None):
    """Sliding windows within episodes as a Ray Dataset with rows `frames` uint8 (L,210,160,3),
    `actions` int64 (L,), `episode_id`, `start_step`. `split` keeps one split, `game` one game
    (its name, as `workers.atari.game_name`), `episodes` (ids) only those episodes' windows. `num_partitions` sets the
    shuffle that gathers episodes (default: one per input file, at most 200)."""
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1, got {length}, {stride}")
    if split is not None and split not in S.SPLITS:
        raise ValueError(f"split must be one of {S.SPLITS} or None, got {split!r}")
    if isinstance(ds_or_path, (str, os.PathLike)):
        num_partitions = num_partitions or min(200, len(parquet_files(str(ds_or_path))))
        ds = read_episodes(str(ds_or_path))
    else:
        ds = ds_or_path
    names = set(ds.schema().names)
    missing = [c for c in (*_READ_COLUMNS, *([S.GAME] if game else [])) if c not in names]
    if missing:
        raise S.DatasetError(f"episode dataset lacks column(s) {missing}; has {sorted(names)}")
    # The split and the game are kept after the shuffle that gathers episodes (an episode lies in one split), not
    # by a filter before it: a filter there can hand the shuffle an empty block without columns,
    # which Ray Data's hash shuffle then fails to concatenate with full ones ("Schema at index i
    # was different"), depending on which block arrives first.
    ds = ds.select_columns([*_READ_COLUMNS, S.GAME] if game else _READ_COLUMNS)
    return ds.groupby(S.EPISODE_ID, num_partitions=num_partitions).map_groups(
        _windows_of_episode, batch_format="pyarrow",
        fn_kwargs=dict(length=length, stride=stride, split=split, game=game or None,
                       episodes=frozenset(episodes) if episodes is not None else None))


def split_sample(frames, actions, n_cond: int, horizon: int, action_mode: str = "future"):
    """Split windows (B, L, ...) into (cond (B,n,...), future (B,T,...), actions).

    "future": a_t..a_{t+T-1} = actions[:, n-1:n+T-1] (T tokens); "past_future":
    a_{t-n+1}..a_{t+T-1} = actions[:, 0:n+T-1] (n+T-1 tokens). Works on numpy arrays and torch
    tensors alike (slicing only)."""
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
    L = frames.shape[1]
    if n_cond < 1 or horizon < 1 or n_cond + horizon > L:
        raise ValueError(f"n_cond={n_cond} + horizon={horizon} must be >= 2 and fit in the "
                         f"window length L={L}")
    if actions.shape[:2] != frames.shape[:2]:
        raise ValueError(f"actions {tuple(actions.shape)} do not match frames "
                         f"{tuple(frames.shape)} on (B, L)")
    cond = frames[:, :n_cond]  # (B, n, H, W, 3)
    future = frames[:, n_cond:n_cond + horizon]  # (B, T, H, W, 3)
    return cond, future, actions[:, window_action_slice(n_cond, horizon, action_mode)]  # (B, A)


def spread_indices(total: int, n: int | None) -> np.ndarray:
    """`n` indices spread evenly over range(total), first and last included (all of them when
    `n` is None or at least `total`): a sample of a split's windows that reaches every part of it,
    where the first `n` would come from its first few episodes."""
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise ValueError(f"a sample of windows needs n >= 1, got {n}")
    # the step (total-1)/(n-1) is >= 1, so the rounded positions are distinct and increasing
    return np.linspace(0, total - 1, n).round().astype(np.int64) if n > 1 else np.zeros(1, np.int64)


def window_keys_of_split(path: str, length: int, stride: int, split: str | None = None,
                         game: str | None = None) -> list[tuple[str, int]]:
    """(episode_id, start_step) of every window `window_dataset` cuts from a split (of one game),
    sorted by episode then start, from the small columns alone (no frame is read)."""
    cols = [S.EPISODE_ID, S.GAME, S.SPLIT]
    tables = []
    for f in parquet_files(path):
        try:
            t = pq.read_table(f, columns=cols)
        except (pa.ArrowInvalid, KeyError, OSError) as e:
            raise S.DatasetError(f"{f}: cannot read columns {cols}: {e}") from e
        if split is not None:
            t = t.filter(pc.equal(t[S.SPLIT], split))
        if game:
            t = t.filter(pc.equal(t[S.GAME], game))
        tables.append(t.select([S.EPISODE_ID]))
    if not tables:
        return []
    eids = pa.concat_tables(tables)[S.EPISODE_ID].to_numpy(zero_copy_only=False).astype(str)
    names, counts = np.unique(eids, return_counts=True)  # sorted episode ids, rows per episode
    return [(str(e), int(s)) for e, n in zip(names, counts) for s in range(0, int(n) - length + 1, stride)]


def cut_windows(files: list[str], starts: dict[str, list[int]], length: int, stride: int,
                split: str | None = None, game: str | None = None) -> Iterator[dict]:
    """The windows of `length` every `stride` steps that start at `starts[episode]`, for each
    episode named, read straight from `files` (those holding its rows) with pyarrow: no Ray and
    no shuffle, for a few chosen windows (held-out scoring, figures). Batches as
    `_windows_of_episode` gives them, episode by episode in id order. An episode of another split
    or game than the one given, or a start that is not a window of its episode, is an error: no
    chosen window is dropped."""
    if not starts:
        return
    want = pa.array(sorted(starts), pa.string())
    parts = []
    for f in files:
        t = pq.read_table(f, columns=[*_READ_COLUMNS, S.GAME], partitioning=None)
        t = t.filter(pc.is_in(t[S.EPISODE_ID].cast(pa.string()), value_set=want))
        if t.num_rows:
            parts.append(t)
    table = pa.concat_tables(parts, promote_options="permissive") if parts else None
    for eid in sorted(starts):
        rows = table.filter(pc.equal(table[S.EPISODE_ID].cast(pa.string()), eid)) if table is not None else None
        if rows is None or rows.num_rows == 0:
            raise S.DatasetError(f"episode {eid}: no rows in {len(files)} file(s) (first: {files[:1]})")
        for col, want in ((S.SPLIT, split), (S.GAME, game)):
            got = str(rows[col][0].as_py())
            if want is not None and got != want:
                raise S.DatasetError(f"episode {eid}: its {col} is {got!r}, not the {want!r} asked for")
        wanted = np.asarray(sorted({int(s) for s in starts[eid]}), np.int64)
        found = []
        for batch in _windows_of_episode(rows, length, stride):
            keep = np.isin(batch["start_step"], wanted)
            found.append(batch["start_step"][keep])
            if keep.any():
                yield {k: v[keep] for k, v in batch.items()}
        lost = np.setdiff1d(wanted, np.concatenate(found) if found else np.zeros(0, np.int64))
        if len(lost):
            raise S.DatasetError(f"episode {eid}: no window of {length} steps every {stride} starts at step(s) "
                                 f"{lost[:5].tolist()} ({rows.num_rows} rows)")


def episode_files(path: str, episodes: Collection[str]) -> dict[str, list[str]]:
    """The files of a dataset root that hold rows of each of `episodes` (an episode may span
    files), from the episode column alone. An episode in none of them is an error."""
    wanted = {str(e) for e in episodes}
    files_of: dict[str, list[str]] = {}
    for f in parquet_files(path):
        ids = pq.read_table(f, columns=[S.EPISODE_ID], partitioning=None)[S.EPISODE_ID]
        for e in set(pc.unique(ids).to_pylist()) & wanted:
            files_of.setdefault(e, []).append(f)
    missing = sorted(wanted - files_of.keys())
    if missing:
        raise ValueError(f"{len(missing)} of the {len(wanted)} episodes asked for are not in {path} "
                         f"(e.g. {missing[:2]})")
    return files_of


def starts_by_episode(keys: Collection[tuple[str, int]]) -> dict[str, list[int]]:
    """(episode_id, start_step) window keys -> {episode_id: its starts}."""
    starts: dict[str, list[int]] = {}
    for e, s in keys:
        starts.setdefault(str(e), []).append(int(s))
    return starts


def read_windows_numpy(path: str, length: int, stride: int, split: str | None = None,
                       max_windows: int | None = None) -> dict[str, np.ndarray]:
    """The windows of a (small, held-out) split as numpy arrays, sorted by (episode, start):
    all of them, or `max_windows` spread evenly over them (`spread_indices`). Chosen from the small
    columns (`window_keys_of_split`); only the chosen windows are cut (`cut_windows`)."""
    keys = window_keys_of_split(path, length, stride, split=split)
    starts = starts_by_episode([keys[i] for i in spread_indices(len(keys), max_windows)] if keys else [])
    files = sorted({f for fs in episode_files(path, starts).values() for f in fs})
    parts = list(cut_windows(files, starts, length, stride, split=split))
    if not parts:
        return {"frames": np.zeros((0, length, *S.FRAME_SHAPE), np.uint8),
                "actions": np.zeros((0, length), np.int64),
                "episode_id": np.zeros((0,), object), "start_step": np.zeros((0,), np.int64)}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["start_step"], out["episode_id"].astype(str)))
    return {k: v[order] for k, v in out.items()}


def validate_dataset(path: str, *, read_frames: bool = True) -> dict:
    """Check every file of an episode dataset; raise DatasetError naming the culprit.

    Checks: the file opens and decodes (row group / rows named otherwise), columns and types,
    frame shape, action range per env id, the -1 sentinel only on episode ends, unique episode
    ids with steps contiguous from 0. Returns counts."""
    files = parquet_files(path)
    scal = [c for c in S.COLUMNS if c != S.FRAME]
    parts, rows = [], 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
        except Exception as e:  # noqa: BLE001 - any reader failure means this file is corrupt
            raise S.DatasetError(f"{f}: not a readable Parquet file ({e})") from e
        S.check_columns(schema, f)
        start = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            where = f"{f} (row group {g}, rows {start}-{start + n - 1})"
            try:
                t = pf.read_row_group(g, columns=S.COLUMNS if read_frames else scal)
            except Exception as e:  # noqa: BLE001
                raise S.DatasetError(f"{where}: corrupt data ({e})") from e
            if read_frames:
                S.frames_from_arrow(t[S.FRAME], where)
            t = t.select(scal).append_column("_file", pa.array([f] * n))
            t = t.append_column("_row", pa.array(np.arange(start, start + n)))
            parts.append(t)
            start += n
        rows += start
    t = pa.concat_tables(parts)
    eid, step = t[S.EPISODE_ID].to_numpy(zero_copy_only=False), t[S.STEP].to_numpy()
    act, fil, row = t[S.ACTION].to_numpy(), t["_file"].to_numpy(zero_copy_only=False), t["_row"].to_numpy()
    for (env_id, env_cfg), idx in _groups(t[S.ENV_ID].to_numpy(zero_copy_only=False),
                                          t[S.ENV_CONFIG].to_numpy(zero_copy_only=False)):
        n = num_actions(env_id, env_cfg)
        bad = idx[(act[idx] < S.NO_ACTION) | (act[idx] >= n)]
        if len(bad):
            i = bad[0]
            raise S.DatasetError(f"{fil[i]} row {row[i]}: action {act[i]} outside {env_id}'s "
                                 f"action space [0, {n})")
    order = np.lexsort((step, eid))
    e, s, a = eid[order], step[order], act[order]
    first = np.r_[True, e[1:] != e[:-1]]
    last = np.r_[e[1:] != e[:-1], True]
    expected = np.arange(len(e)) - np.maximum.accumulate(np.where(first, np.arange(len(e)), 0))
    if (s != expected).any():
        i = order[np.flatnonzero(s != expected)[0]]
        raise S.DatasetError(f"{fil[i]} row {row[i]}: episode {eid[i]} step {step[i]} breaks the "
                             f"0-based contiguous step sequence (duplicated or missing rows)")
    bad = np.flatnonzero((a == S.NO_ACTION) != last)
    if len(bad):
        i = order[bad[0]]
        raise S.DatasetError(f"{fil[i]} row {row[i]}: episode {eid[i]} has action {act[i]} at step "
                             f"{step[i]}; -1 must mark exactly the episode's last row")
    return dict(files=len(files), rows=rows, episodes=int(first.sum()))


def _groups(*cols: np.ndarray):
    """(key tuple, row indices) for each distinct combination of a few low-cardinality columns."""
    combo = np.char.add(np.char.add(cols[0].astype(str), "\x1f"), cols[1].astype(str))
    uniq, inv = np.unique(combo, return_inverse=True)
    for j, u in enumerate(uniq):
        yield tuple(u.split("\x1f")), np.flatnonzero(inv == j)
