"""A training worker's shard of episodes held in device memory, sampled as windows by index.

Why. Cutting windows with Ray Data (`workers/clips.py:window_dataset`) groups every episode with
a shuffle: on a 66k-frame dataset that costs ~50 s before the first batch and again at every epoch
boundary (seen on the GPU machine: a 150 s VAE budget trained for ~55 s). A training worker instead
reads its shard of *frames* once through Ray Data (`iter_batches`, Arrow batches, no shuffle),
keeps them as one uint8 tensor on its device (100,800 bytes a frame: 66k frames are 6.6 GB, a
tenth of an H100), and draws each batch as random windows: a gather of `B x L` frames on the
device, no host work per step.

Windows. Rows are ordered by (episode, step) through an index (the frames are not moved); a window
of length L starts at sorted position p when positions p..p+L-1 are consecutive steps of one
episode. An episode whose rows went to several ranks gives windows only within each rank's
contiguous runs. Every valid start is a candidate (stride 1), drawn uniformly with replacement by
a generator seeded from (seed, rank, step), so a resumed run draws what an uninterrupted one would.

Latents. With a frame-wise VAE (`temporal_kernel == 1` and `temporal_downsample == 1`) a frame's
latent does not depend on its neighbours, so `encode_frames` replaces the pixels by their latents
once (66k frames of a x4 VAE with 8 channels: 4.5 GB in float32) and a DiT step does no VAE work.

Bad input is named: a frame of the wrong size, an action outside the game's action space, two rows
with the same (episode, step).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from workers import schema as S
from workers.atari import num_actions

STORE_COLUMNS = [S.EPISODE_ID, S.STEP, S.FRAME, S.ACTION, S.ENV_ID, S.ENV_CONFIG]


class FrameStore:
    """Frames (or latents) of a set of episodes on one device, with their actions, ordered by
    (episode, step) through `order`."""

    def __init__(self, values: Tensor, actions: Tensor, episode: Tensor, step: Tensor,
                 episode_ids: list[str] | None = None):
        """values: (N, ...) frames or latents, actions/episode/step: (N,) int64 on values.device,
        in any row order; episode_ids[code] names the episode of code `code`."""
        n = len(values)
        if not (len(actions) == len(episode) == len(step) == n):
            raise ValueError(f"FrameStore: {n} values but {len(actions)} actions, {len(episode)} "
                             f"episode codes, {len(step)} steps")
        self.values = values
        device = values.device
        key = episode.to(device) * (int(step.max()) + 1 if n else 1) + step.to(device)  # (N,)
        self.order = torch.argsort(key)  # (N,) row of each sorted position
        self.episode = episode.to(device)[self.order]  # (N,) sorted
        self.step = step.to(device)[self.order]  # (N,) sorted
        self.actions = actions.to(device)  # (N,) by row, gathered through order
        self.episode_ids = list(episode_ids) if episode_ids is not None else []
        self._starts: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.values)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def duplicates(self) -> tuple[int, int] | None:
        """(episode code, step) of the first repeated row, or None."""
        same = (self.episode[1:] == self.episode[:-1]) & (self.step[1:] == self.step[:-1])
        if not bool(same.any()):
            return None
        i = int(torch.nonzero(same)[0, 0])
        return int(self.episode[i]), int(self.step[i])

    def starts(self, length: int) -> Tensor:
        """Sorted positions where a window of `length` consecutive steps of one episode begins."""
        if length not in self._starts:
            n = len(self) - length + 1
            if n <= 0:
                self._starts[length] = torch.zeros(0, dtype=torch.long, device=self.device)
            else:
                ok = (self.episode[length - 1:] == self.episode[:n]) & \
                     (self.step[length - 1:] - self.step[:n] == length - 1)  # (n,)
                self._starts[length] = torch.nonzero(ok).squeeze(1)
        return self._starts[length]

    def num_windows(self, length: int) -> int:
        return len(self.starts(length))

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`batch_size` random windows: values (B, L, ...) and actions (B, L) int64."""
        starts = self.starts(length)
        if len(starts) == 0:
            raise RuntimeError(f"no window of {length} consecutive steps in this worker's "
                               f"{len(self)} rows: collect more data or shorten the clips")
        pick = torch.randint(len(starts), (batch_size,), generator=generator, device=generator.device)
        pos = starts[pick.to(self.device)][:, None] + torch.arange(length, device=self.device)  # (B, L)
        rows = self.order[pos]  # (B, L)
        return self.values[rows], self.actions[rows]

    @torch.no_grad()
    def encode_frames(self, encode: Callable[[Tensor], Tensor], chunk: int = 256) -> None:
        """Replace the uint8 frames (N, H, W, 3) by `encode(frames (b, 1, H, W, 3)) -> (b, 1, ...)`
        latents, chunk by chunk (frame-wise encoders only: see the module docstring)."""
        out = None
        for i in range(0, len(self), chunk):
            z = encode(self.values[i:i + chunk][:, None])[:, 0].float()  # (b, C, h, w)
            if out is None:
                out = torch.empty((len(self), *z.shape[1:]), dtype=torch.float32, device=self.device)
            out[i:i + len(z)] = z
        self.values = out if out is not None else self.values

    @classmethod
    def from_batches(cls, batches: Iterable[pa.Table], device: torch.device,
                     max_bytes: float = float("inf"), source: str = "training shard") -> "FrameStore":
        """Build from Arrow batches with the columns `STORE_COLUMNS` (e.g. a Ray Train dataset
        shard's `iter_batches(batch_format="pyarrow")`). Fails naming the episode on a bad frame,
        an action outside the game's action space or a repeated (episode, step); fails before
        holding more than `max_bytes` of frames."""
        codes: dict[str, int] = {}
        frames, actions, episodes, steps = [], [], [], []
        total, n_act = 0, {}
        for b in batches:
            if b.num_rows == 0:
                continue
            missing = [c for c in STORE_COLUMNS if c not in b.column_names]
            if missing:
                raise S.DatasetError(f"{source}: batch lacks column(s) {missing}; has {b.column_names}")
            eids = b[S.EPISODE_ID].to_pylist()
            ep = np.fromiter((codes.setdefault(e, len(codes)) for e in eids), np.int64, len(eids))
            act = b[S.ACTION].to_numpy(zero_copy_only=False).astype(np.int64)
            env_keys = list(zip(b[S.ENV_ID].to_pylist(), b[S.ENV_CONFIG].to_pylist()))
            for k in set(env_keys) - set(n_act):
                n_act[k] = num_actions(*k)
            limit = np.fromiter((n_act[k] for k in env_keys), np.int64, len(env_keys))
            bad = (act < S.NO_ACTION) | (act >= limit)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise S.DatasetError(f"{source}: episode {eids[i]} step {int(b[S.STEP][i].as_py())}: action "
                                     f"{int(act[i])} is outside {env_keys[i][0]}'s action space [0, {int(limit[i])})")
            step = b[S.STEP].to_numpy(zero_copy_only=False).astype(np.int64)
            try:
                fr = S.frames_from_arrow(b[S.FRAME], source)
            except S.DatasetError as e:
                _name_bad_frame(b[S.FRAME], eids, step, source)
                raise S.DatasetError(f"{e} (episodes {eids[0]}..{eids[-1]} of that batch)") from None
            total += fr.nbytes
            if total > max_bytes:
                raise MemoryError(f"{source}: more than {max_bytes / 2**30:.1f} GiB of frames for one worker "
                                  f"(TrainSettings.max_store_gib); add workers, or use data_loader='stream'")
            with warnings.catch_warnings():  # a read-only view of the Arrow buffer, copied below
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(fr)
            frames.append(t.to(device) if device.type != "cpu" else t.clone())
            actions.append(torch.from_numpy(act))
            episodes.append(torch.from_numpy(ep))
            steps.append(torch.from_numpy(step))
        if not frames:
            raise RuntimeError(f"{source}: no rows (is the split empty for this game?)")
        values = torch.cat(frames) if len(frames) > 1 else frames[0]
        del frames
        store = cls(values, torch.cat(actions), torch.cat(episodes), torch.cat(steps), list(codes))
        dup = store.duplicates()
        if dup is not None:
            raise S.DatasetError(f"{source}: episode {store.episode_ids[dup[0]]} has step {dup[1]} twice; "
                                 "duplicated rows")
        return store


def _name_bad_frame(col, eids: list, step: np.ndarray, source: str) -> None:
    """Raise naming the episode and step of the first frame value of the wrong size (binary
    layouts; other layouts keep frames_from_arrow's message)."""
    import pyarrow.compute as pc

    try:
        lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, TypeError):
        return
    bad = np.flatnonzero(lengths != S.FRAME_BYTES)
    if len(bad):
        i = int(bad[0])
        raise S.DatasetError(f"{source}: episode {eids[i]} step {int(step[i])}: column {S.FRAME!r} holds "
                             f"{int(lengths[i])} bytes, expected a uint8 frame of shape {S.FRAME_SHAPE} "
                             f"({S.FRAME_BYTES} bytes)")


def shard_batches(shard, batch_size: int = 512) -> Iterable[pa.Table]:
    """One pass over a Ray Train dataset shard as Arrow batches."""
    return shard.iter_batches(batch_size=batch_size, batch_format="pyarrow")


def window_generator(device: torch.device, seed: int, rank: int, step: int,
                     gen: torch.Generator | None = None) -> torch.Generator:
    """The generator of one step's window draws (deterministic in seed, rank and step)."""
    gen = gen or torch.Generator(device=device)
    return gen.manual_seed((seed * 1_000_003 + rank) * 1_000_033 + step)
