"""The Ray Datasets every stage reads from a collection: windows, spread windows, rows, and the
description of a job's training data.

    clip_dataset(root, game, split, length, stride)        windows of one split (Ray Data, grouped by episode)
    spread_window_dataset(root, game, split, L, s, n)      n of them spread over the split, or given ones
    chosen_window_dataset(root, keys, L, s)                 given windows, cut without a shuffle
    frame_dataset(root, game, split)                       the rows, for the "device" loader's FrameStore
    training_dataset(cfg, length, stride)                  what a training job's workers read
    training_data_input(root, game, share)                 the training rows described for MLflow

A window is `frames` uint8 (L, 210, 160, 3), `actions` int64 (L,), `episode_id`, `start_step`
(`workers/clips.py` cuts them); splits are by episode (`workers/schema.py`). These run on the
driver and return lazy Ray Datasets: nothing is read until a consumer iterates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Collection

import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers import schema as S
from workers.clips import (episode_files, episode_share_mask, keep_episode_share, parquet_files, read_episodes,
                           spread_indices, starts_by_episode, window_dataset, window_keys_of_split)
from workers.frame_store import STORE_COLUMNS


def clip_dataset(data_root: str, game: str, split: str, length: int, stride: int,
                 episodes: Collection[str] | None = None):
    """Ray Dataset of windows (`frames` uint8 (L, 210, 160, 3), `actions` int64 (L,)) of one split
    of one game (every game when `game` is empty); of the given episodes alone when `episodes` is
    set: only the files holding rows of that split, game and episodes are read."""
    import ray

    files = parquet_files(data_root)
    # Files are picked by their small columns; rows of other splits, games or episodes in the files
    # kept are dropped after the shuffle that gathers episodes (`window_dataset`), never by a filter
    # before it: such a filter can hand Ray Data's hash shuffle an empty block without columns
    # beside full ones ("Schema at index i was different"), which a 120k-step collection on 16
    # cores hit and CPU-sized collections did not.
    wanted = set(episodes) if episodes is not None else None
    keep = []
    for f in files:
        t = pq.read_table(f, columns=[S.EPISODE_ID, S.SPLIT, S.GAME])
        if split is not None and split not in set(t[S.SPLIT].to_pylist()):
            continue
        if game and game not in set(t[S.GAME].to_pylist()):
            continue
        if wanted is not None and not wanted & set(t[S.EPISODE_ID].to_pylist()):
            continue
        keep.append(f)
    if not keep and wanted is not None:
        raise ValueError(f"none of the {len(wanted)} episodes asked for is in {data_root}")
    keep = keep or files  # no row of that split or game: an empty dataset, as the callers expect
    rows = ray.data.read_parquet(keep, partitioning=None)  # as workers.clips.read_episodes
    # One shuffle partition per file, as window_dataset does for a path: Ray's default of 200
    # partitions costs minutes of scheduling on a small machine.
    partitions = max(1, min(200, len(keep)))
    return window_dataset(rows, length=length, stride=stride, split=split, num_partitions=partitions,
                          episodes=episodes, game=game or None)


def spread_window_dataset(data_root: str, game: str, split: str, length: int, stride: int, n: int | None,
                          keys: set[tuple[str, int]] | None = None):
    """`n` windows of a split (those `clip_dataset` cuts), spread evenly over its windows in
    (episode, start) order so that every episode weighs in (all of them when n is None); or exactly
    the windows `keys` ((episode_id, start_step) pairs) when given. Chosen from the small columns
    alone; only the chosen windows are cut (`chosen_window_dataset`: 32 spread windows of Breakout's
    361 training episodes touch at most 32 of them). Returns the dataset and the number of windows
    chosen."""
    if keys is None:
        every = window_keys_of_split(data_root, length, stride, split=split, game=game)
        keys = {every[i] for i in spread_indices(len(every), n)}
    chosen = frozenset(keys)
    if not chosen:  # an empty dataset with the windows' columns, as the callers expect
        ds = clip_dataset(data_root, game, split, length, stride)
        return ds.filter(lambda row: False), 0
    return chosen_window_dataset(data_root, chosen, length, stride, split=split, game=game), len(chosen)


def chosen_window_dataset(data_root: str, keys: Collection[tuple[str, int]], length: int, stride: int,
                          split: str | None = None, game: str | None = None, episodes_per_task: int = 8):
    """Ray Dataset of exactly the windows `keys` ((episode_id, start_step) pairs) without a shuffle:
    the driver finds the files holding each episode's rows from the small columns, and each read
    task cuts the windows of up to `episodes_per_task` episodes from those files
    (`workers.clips.cut_windows`). A few hundred chosen windows (held-out scoring) touch a few
    hundred episodes at most; gathering them by a hash shuffle of every row costs seconds of
    scheduling even on a tiny collection. An episode not in the collection is an error."""
    import ray

    starts = starts_by_episode(keys)
    files_of = episode_files(data_root, starts)
    eps = sorted(starts)
    n_tasks = -(-len(eps) // max(1, episodes_per_task))
    tasks = [{"task": json.dumps({"starts": {e: starts[e] for e in part},
                                  "files": sorted({f for e in part for f in files_of[e]})})}
             for part in (eps[i::n_tasks] for i in range(n_tasks))]
    return ray.data.from_items(tasks).map_batches(
        _cut_task, batch_size=1, fn_kwargs=dict(length=length, stride=stride, split=split, game=game or None))


def _cut_task(batch: dict, length: int, stride: int, split: str | None, game: str | None):
    """map_batches UDF of `chosen_window_dataset`: one task's episodes -> their chosen windows."""
    from workers.clips import cut_windows

    for task in batch["task"]:
        t = json.loads(str(task))
        yield from cut_windows(t["files"], t["starts"], length, stride, split=split, game=game)


def frame_dataset(data_root: str, game: str, split: str):
    """Ray Dataset of the rows (frames, actions, episode and step) of one split of one game (every
    game when `game` is empty): what the "device" loader reads into each worker's memory."""
    from ray.data.expressions import col

    ds = read_episodes(data_root, columns=[*STORE_COLUMNS, S.GAME, S.SPLIT])
    ds = ds.filter(expr=col(S.SPLIT) == split)
    if game:
        ds = ds.filter(expr=col(S.GAME) == game)
    return ds.select_columns(STORE_COLUMNS)


def training_dataset(cfg, length: int, stride: int):
    """What a training job's workers read (`cfg`: a TrainSettings): rows for the "device" loader,
    windows of `length` every `stride` steps for "stream"; of the `train_episodes` share of the
    training episodes."""
    if cfg.data_loader == "device":
        return keep_episode_share(frame_dataset(cfg.data_root, cfg.game, "train"), cfg.train_episodes)
    ds = keep_episode_share(clip_dataset(cfg.data_root, cfg.game, "train", length, stride), cfg.train_episodes)
    return ds.select_columns(["frames", "actions"])  # tensors only: iter_torch_batches rejects strings


def training_data_input(data_root: str, game: str, episode_share: float = 1.0) -> dict[str, Any]:
    """The training rows of a job (the train split of `game`, every game when empty, and the
    `episode_share` of its episodes) described for `Tracker.log_dataset`: the Parquet root as the
    source, the columns' Arrow types, a digest of the files (names, sizes) and the selection, and
    a profile of counts. Reads the small columns only."""
    root = Path(data_root).expanduser().resolve()
    files = parquet_files(str(root))
    h = hashlib.sha256(json.dumps({"game": game, "split": "train", "share": episode_share}).encode())
    rows, episodes, schema = 0, set(), None
    for f in files:
        h.update(f"{os.path.relpath(f, root)}:{os.path.getsize(f)};".encode())
        t = pq.read_table(f, columns=[S.GAME, S.EPISODE_ID, S.SPLIT], partitioning=None)
        keep = pc.equal(t[S.SPLIT], "train")
        if game:
            keep = pc.and_(keep, pc.equal(t[S.GAME], game))
        t = t.filter(keep)
        if episode_share < 1.0 and t.num_rows:
            t = t.filter(episode_share_mask(t[S.EPISODE_ID], episode_share))
        rows += t.num_rows
        episodes.update(pc.unique(t[S.EPISODE_ID]).to_pylist())  # an episode may span files
        schema = schema or pq.read_schema(f)
    return {"source": str(root), "name": f"{root.name}/{game or 'all-games'}/train",
            "digest": h.hexdigest()[:16],
            "schema": {c: str(schema.field(c).type) for c in S.COLUMNS if c in schema.names},
            "profile": {"rows": rows, "episodes": len(episodes), "files": len(files), "game": game or "all",
                        "split": "train", "episode_share": episode_share, "frame_shape": list(S.FRAME_SHAPE)}}
