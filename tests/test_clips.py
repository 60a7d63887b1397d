"""Clip windows over real Parquet through Ray Data: boundaries, edge cases, sample splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers import schema as S
from workers.atari import EnvSettings
from workers.clips import (TENSOR_COLUMNS, episode_share_mask, keep_episode_share, parquet_files, read_windows_numpy,
                           split_sample, spread_indices, window_dataset, window_keys_of_split)


def _write_episodes(path, lengths: dict[str, int], split="train"):
    """Real dataset files whose frames carry their step number in every pixel."""
    rows = []
    for eid, n in lengths.items():
        steps = np.arange(n)
        frames = np.broadcast_to((steps % 256).astype(np.uint8)[:, None, None, None],
                                 (n, *S.FRAME_SHAPE))
        acts = (steps % 3).astype(np.int32)
        acts[-1] = S.NO_ACTION
        rows.append(pa.table({
            S.GAME: ["Pong"] * n, S.EPISODE_ID: [eid] * n, S.STEP: steps.astype(np.int32),
            S.FRAME: S.frames_to_arrow(frames), S.ACTION: acts,
            S.REWARD: np.zeros(n, np.float32), S.TERMINATED: steps == n - 1,
            S.TRUNCATED: np.zeros(n, bool), S.LIVES: np.zeros(n, np.int32),
            S.ENV_ID: ["ALE/Pong-v5"] * n, S.ENV_CONFIG: [EnvSettings().to_json()] * n,
            S.RESET_SEED: np.zeros(n, np.int64), S.SPLIT: [split] * n}))
    t = pa.concat_tables(rows)
    path.mkdir(parents=True, exist_ok=True)
    # two files that cut episode "b" in the middle: windows must still be whole episodes
    pq.write_table(t.slice(0, t.num_rows // 2), path / "part-0.parquet")
    pq.write_table(t.slice(t.num_rows // 2), path / "part-1.parquet")


def test_window_edges(ray_local, tmp_path):
    _write_episodes(tmp_path / "episodes" / "game=Pong", {"short": 5, "exact": 8, "b": 21})
    w = read_windows_numpy(str(tmp_path), length=8, stride=4)
    got = list(zip(w["episode_id"], w["start_step"]))
    # "short" (5 < 8) gives none, "exact" one, "b" starts 0,4,8,12 (13..20 fit no further start)
    assert got == [("b", 0), ("b", 4), ("b", 8), ("b", 12), ("exact", 0)]
    assert w["frames"].shape == (5, 8, 210, 160, 3) and w["frames"].dtype == np.uint8
    assert w["actions"].dtype == np.int64 and w["actions"].shape == (5, 8)
    # each window holds its own episode's steps in order: pixel value == step
    expect = w["start_step"][:, None] + np.arange(8)
    assert np.array_equal(w["frames"][:, :, 0, 0, 0], expect)
    assert np.array_equal(w["frames"].max(axis=(2, 3, 4)), w["frames"].min(axis=(2, 3, 4)))
    assert w["actions"][-1, -1] == S.NO_ACTION  # "exact"'s window ends on the final frame
    assert len(read_windows_numpy(str(tmp_path), 8, 4, split="test")["start_step"]) == 0


def test_window_keys_of_a_split_match_the_cut_windows_and_spread_reaches_every_episode(ray_local, tmp_path):
    """The keys read from the small columns are exactly the windows window_dataset cuts (episode
    "b" spans both files), per split; a sample of them spreads over every episode in order."""
    _write_episodes(tmp_path / "episodes" / "game=Pong", {"short": 5, "exact": 8, "b": 21, "c": 40}, split="test")
    _write_episodes(tmp_path / "other" / "game=Pong", {"t": 30}, split="train")
    keys = window_keys_of_split(str(tmp_path), 8, 4, split="test", game="Pong")
    cut = sorted((str(r["episode_id"]), int(r["start_step"])) for r in
                 window_dataset(str(tmp_path), 8, 4, split="test").select_columns(["episode_id", "start_step"]).take_all())
    assert keys == cut
    # read_windows_numpy cuts those windows from the keys, without Ray Data's shuffle: the same frames
    every = read_windows_numpy(str(tmp_path), 8, 4, split="test")
    assert keys == list(zip(every["episode_id"], every["start_step"].tolist()))
    assert np.array_equal(every["frames"][:, :, 0, 0, 0], every["start_step"][:, None] + np.arange(8))
    # in Ray Data, one read task per episode (episode "c" spans both files): the same windows
    from workers.clips import cut_windows
    from workers.data import chosen_window_dataset

    rows = chosen_window_dataset(str(tmp_path), keys, 8, 4, split="test", game="Pong", episodes_per_task=1).take_all()
    assert sorted((str(r["episode_id"]), int(r["start_step"])) for r in rows) == keys
    assert all(np.array_equal(r["frames"][:, 0, 0, 0], r["start_step"] + np.arange(8)) for r in rows)
    with pytest.raises(S.DatasetError, match="episode t: its split is 'train', not the 'test' asked for"):
        list(cut_windows(parquet_files(str(tmp_path)), {"t": [0]}, 8, 4, split="test"))
    assert keys[:5] == [("b", 0), ("b", 4), ("b", 8), ("b", 12), ("c", 0)] and keys[-1] == ("exact", 0)
    assert window_keys_of_split(str(tmp_path), 8, 4, split="train") == [("t", s) for s in range(0, 23, 4)]
    assert window_keys_of_split(str(tmp_path), 8, 4, split="test", game="Breakout") == []
    # 4 of the 14 test windows: the first, the last and two between, from all three episodes
    pick = spread_indices(len(keys), 4)
    assert pick.tolist() == [0, 4, 9, 13]
    assert {keys[i][0] for i in pick} == {"b", "c", "exact"}
    sample = read_windows_numpy(str(tmp_path), 8, 4, split="test", max_windows=4)
    assert list(zip(sample["episode_id"], sample["start_step"].tolist())) == [keys[i] for i in pick]
    assert np.array_equal(sample["frames"][:, 0, 0, 0, 0], sample["start_step"] % 256)
    for total in (1, 7, 256, 1000):
        for n in (1, 2, 5, 255, 256):
            got = spread_indices(total, n)
            assert len(got) == min(n, total) and len(set(got.tolist())) == len(got)
            assert (np.diff(got) > 0).all() and got[0] == 0 and (n == 1 or got[-1] == total - 1)
    assert spread_indices(10, None).tolist() == list(range(10))
    with pytest.raises(ValueError, match="n >= 1"):
        spread_indices(10, 0)


def test_a_share_of_episodes_keeps_whole_episodes_the_same_in_every_call(ray_local):
    """train_episodes: a fixed subset of whole episodes, about the share asked for, nested (a
    smaller share keeps a subset of a larger one's episodes), identical across calls and blocks."""
    import ray

    ids = [f"ep{i:03d}-pid{1000 + i}" for i in range(400)]
    rows = pa.table({S.EPISODE_ID: [e for e in ids for _ in range(3)], S.STEP: [s for _ in ids for s in range(3)]})
    kept = {}
    for share in (0.25, 0.5, 1.0):
        mask = episode_share_mask(rows[S.EPISODE_ID], share).to_numpy(zero_copy_only=False)
        per_episode = mask.reshape(400, 3)
        assert (per_episode.all(1) | ~per_episode.any(1)).all()  # whole episodes
        kept[share] = {e for e, k in zip(ids, per_episode[:, 0]) if k}
        assert abs(len(kept[share]) - 400 * share) <= 40, (share, len(kept[share]))
        # through Ray Data, over blocks that cut episodes apart: the same episodes, every row of them
        ds = keep_episode_share(ray.data.from_arrow(rows).repartition(7), share)
        got = ds.to_pandas()
        assert set(got[S.EPISODE_ID]) == kept[share] and len(got) == 3 * len(kept[share])
    assert kept[0.25] <= kept[0.5] <= kept[1.0] and kept[1.0] == set(ids)
    with pytest.raises(ValueError, match="share"):
        keep_episode_share(ray.data.from_arrow(rows), 0.0)
    from workers.train_common import TrainSettings

    with pytest.raises(ValueError, match="train_episodes=1.5"):
        TrainSettings(train_episodes=1.5)


def test_split_sample_modes_and_errors():
    B, L, n, T = 2, 8, 4, 2
    frames = np.arange(B * L).reshape(B, L, 1, 1, 1).repeat(3, -1).astype(np.uint8)
    actions = np.arange(B * L).reshape(B, L).astype(np.int64)
    cond, fut, a = split_sample(frames, actions, n, T, "future")
    assert cond.shape == (B, n, 1, 1, 3) and fut.shape == (B, T, 1, 1, 3)
    assert np.array_equal(fut[:, 0, 0, 0, 0], frames[:, n, 0, 0, 0])
    assert np.array_equal(a, actions[:, n - 1:n + T - 1])  # a_t .. a_{t+T-1}
    _, _, a2 = split_sample(frames, actions, n, T, "past_future")
    assert a2.shape == (B, n + T - 1) and np.array_equal(a2[:, -T:], a)
    with pytest.raises(ValueError, match="horizon=5 .* L=8"):
        split_sample(frames, actions, 4, 5)
    with pytest.raises(ValueError, match="action_mode"):
        split_sample(frames, actions, 4, 2, "both")


def test_windows_on_recorded_games_torch(tiny_dataset):
    import torch

    # materialized: both reads below take their batches from one run of the shuffle
    ds = window_dataset(tiny_dataset.root, length=6, stride=3, split="train").materialize()
    nb = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    batch = next(iter(ds.select_columns(list(TENSOR_COLUMNS)).iter_torch_batches(batch_size=4)))
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (4, 6, 210, 160, 3)
    assert batch["actions"].dtype == torch.int64
    cond, fut, a = split_sample(batch["frames"], batch["actions"], 4, 2, "future")
    assert cond.shape == (4, 4, 210, 160, 3) and fut.shape == (4, 2, 210, 160, 3)
    assert a.shape == (4, 2) and (a >= 0).all()  # the -1 of a last frame is never read
    # a window equals the stored rows of its episode
    eid, s0 = nb["episode_id"][0], int(nb["start_step"][0])
    t = pa.concat_tables([pq.ParquetFile(f).read() for f in parquet_files(tiny_dataset.root)])
    ep = t.filter(pa.compute.equal(t[S.EPISODE_ID], eid))
    ep = ep.take(pa.compute.sort_indices(ep, [(S.STEP, "ascending")]))
    assert ep[S.SPLIT][0].as_py() == "train"
    assert np.array_equal(S.frames_from_arrow(ep[S.FRAME])[s0:s0 + 6], nb["frames"][0])


def test_bad_frames_and_lengths_are_named(ray_local, tmp_path):
    _write_episodes(tmp_path / "episodes" / "game=Pong", {"e": 10})
    f = parquet_files(str(tmp_path))[0]
    t = pq.read_table(f, partitioning=None)
    small = S.frames_to_arrow(np.zeros((t.num_rows, 84, 84, 3), np.uint8))
    pq.write_table(t.set_column(t.schema.get_field_index(S.FRAME), S.FRAME, small), f)
    with pytest.raises(Exception, match=r"episode e \(rows = steps\): column 'frame' row 0 holds 21168 bytes"):
        read_windows_numpy(str(tmp_path), 4, 2)
    with pytest.raises(S.DatasetError, match="lacks column"):
        window_dataset(ray_local.data.from_items([{"episode_id": "x"}]), 4, 2)
