"""The "device" training loader (workers/frame_store.py) on real Parquet read through Ray Data:
windows stay inside episodes across file and batch boundaries, draws are reproducible, bad rows
are named, and cached frame-wise latents equal the VAE's encoding of the window."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_clips import _write_episodes

from pipeline.train import measure_latent_scale
from workers import schema as S
from workers.clips import parquet_files
from workers.data import frame_dataset
from workers.frame_store import FrameStore, window_generator


def _store(root, batch_size=7) -> FrameStore:
    ds = frame_dataset(str(root), "Pong", "train")
    return FrameStore.from_batches(ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"),
                                   torch.device("cpu"))


def test_windows_stay_in_episodes_and_draws_repeat(ray_local, tmp_path):
    # "b" is cut across two files; batches of 7 rows cut every episode again.
    _write_episodes(tmp_path / "episodes" / "game=Pong", {"short": 5, "exact": 8, "b": 21})
    _write_episodes(tmp_path / "episodes" / "game=Pong" / "t", {"held_out": 30}, split="test")
    store = _store(tmp_path)
    assert len(store) == 5 + 8 + 21 and sorted(store.episode_ids) == ["b", "exact", "short"]
    # every start of 8 consecutive steps: none in "short", 1 in "exact", 14 in "b"
    assert store.num_windows(8) == 1 + 14
    assert store.num_windows(5) == 1 + 4 + 17
    gen = window_generator(torch.device("cpu"), seed=3, rank=0, step=5)
    frames, actions = store.sample(64, 8, gen)
    assert frames.shape == (64, 8, *S.FRAME_SHAPE) and frames.dtype == torch.uint8
    steps = frames[:, :, 0, 0, 0].long()  # pixel value == step (test_clips' episodes)
    assert torch.equal(steps - steps[:, :1], torch.arange(8).expand(64, 8))  # consecutive steps
    assert torch.equal(actions[:, :-1], steps[:, :-1] % 3)  # each frame's own action
    # the episode's final frame carries the no-action sentinel; windows may end on it
    end_b = steps[:, -1] == 20  # only "b" reaches step 20
    assert end_b.any() and bool((actions[end_b, -1] == S.NO_ACTION).all())
    inner = (steps[:, -1] != 20) & (steps[:, -1] != 7)  # not an episode's final frame
    assert torch.equal(actions[inner, -1], steps[inner, -1] % 3)
    # the same (seed, rank, step) draws the same windows; another step draws others
    again, _ = store.sample(64, 8, window_generator(torch.device("cpu"), 3, 0, 5))
    other, _ = store.sample(64, 8, window_generator(torch.device("cpu"), 3, 0, 6))
    assert torch.equal(frames, again) and not torch.equal(frames, other)
    # all 15 starts are drawn over enough draws (uniform over valid starts)
    many, _ = store.sample(2000, 8, gen)
    assert len(torch.unique(many[:, 0, 0, 0, 0])) == 14  # steps 0..13 ("exact" and "b" share 0)
    with pytest.raises(RuntimeError, match="no window of 40 consecutive steps"):
        store.sample(2, 40, gen)


def test_bad_rows_are_named(ray_local, tmp_path):
    _write_episodes(tmp_path / "episodes" / "game=Pong", {"e": 10})
    f = parquet_files(str(tmp_path))[0]
    t = pq.read_table(f, partitioning=None)
    # an action outside Pong's 6 actions
    acts = t[S.ACTION].to_numpy().copy()
    acts[2] = 9
    pq.write_table(t.set_column(t.schema.get_field_index(S.ACTION), S.ACTION, [acts]), f)
    with pytest.raises(S.DatasetError, match=r"episode e step 2: action 9 is outside ALE/Pong-v5's action space \[0, 6\)"):
        _store(tmp_path)
    # a frame of the wrong size
    small = S.frames_to_arrow(np.zeros((t.num_rows, 84, 84, 3), np.uint8))
    pq.write_table(t.set_column(t.schema.get_field_index(S.FRAME), S.FRAME, small), f)
    with pytest.raises(S.DatasetError, match=r"episode e step [0-4]: column 'frame' holds 21168 bytes"):
        _store(tmp_path)
    # the same rows twice (a second copy of the file)
    pq.write_table(t, f)
    pq.write_table(t, f.replace(".parquet", "-copy.parquet"))
    with pytest.raises(S.DatasetError, match=r"episode e has step 0 twice"):
        _store(tmp_path)
    with pytest.raises(MemoryError, match="max_store_gib"):
        FrameStore.from_batches(frame_dataset(str(tmp_path), "Pong", "train").iter_batches(batch_format="pyarrow"),
                                torch.device("cpu"), max_bytes=10 * S.FRAME_BYTES)


def test_cached_latents_match_encoding_the_window(tiny_dataset):
    from models.vae import VAE_tiny
    from models.pixels import pixels_to_model

    torch.manual_seed(0)
    vae = VAE_tiny(latent_channels=4, temporal_kernel=1).eval()
    ds = frame_dataset(tiny_dataset.root, "Breakout", "train")
    store = FrameStore.from_batches(ds.iter_batches(batch_size=100, batch_format="pyarrow"), torch.device("cpu"))
    gen = window_generator(torch.device("cpu"), 0, 0, 0)
    frames, actions = store.sample(3, 6, gen)
    with torch.no_grad():
        want = vae.encode(pixels_to_model(frames))[0]  # (3, 6, C, h, w)
        store.encode_frames(lambda f: vae.encode(pixels_to_model(f))[0], chunk=50)
    lat, actions2 = store.sample(3, 6, window_generator(torch.device("cpu"), 0, 0, 0))
    assert lat.shape == want.shape and torch.equal(actions, actions2)
    torch.testing.assert_close(lat, want, rtol=1e-4, atol=1e-5)
    # a real recorded game's steps are consecutive in every drawn window
    assert store.num_windows(6) > 0 and store.num_windows(6) < len(store)


def test_latent_scale_reads_rows_not_windows(tiny_dataset, tmp_path):
    from models.vae import VAE_tiny
    from workers.world_model import save_vae

    torch.manual_seed(0)
    path = save_vae(tmp_path / "vae", VAE_tiny(latent_channels=4))
    scale = measure_latent_scale(str(path), tiny_dataset.root, "Pong", length=8, num_clips=4)
    assert np.isfinite(scale) and scale > 0
    with pytest.raises(ValueError, match="no 5000 consecutive training steps of Pong"):
        measure_latent_scale(str(path), tiny_dataset.root, "Pong", length=5000)
