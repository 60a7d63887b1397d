"""Inverse dynamics (IDM): which action turned frame o_t into o_{t+1}? The action-fidelity measure.

MineWorld's "action F1": a classifier trained on REAL frame pairs (o_t, o_{t+1}) -> a_t of a game's
training split is read on (a) real held-out pairs, the ceiling, and (b) a world model's generated
pairs: each generated frame and the frame before it in the same rollout (the last condition frame
for the first one), labelled with the action the model was given (`generated_pairs`). A model that
ignores its actions leaves nothing for the IDM to read, so its generated pairs score at chance.

Input. Frames are average-pooled 2x2 to 105x80 RGB inside `forward` (callers pass raw uint8
210x160x3). The factor 2 divides both sides, so the pooling is exact and cheap, and the smallest
sprites survive: Breakout's ball (2x4 px) becomes a 1x2 (or half-intensity 2x2) blob, its paddle
(16x4 px) 8x2, Pong's ball likewise; 84x84 would blur the 4-px ball over 1.6 rows. Colour is kept
because the network's first layer is the only one that pays for it (9 input channels instead of 3),
and a grey conversion can merge equiluminant sprites with their background in other games.
The pair enters as [o_t, o_{t+1}, g (o_{t+1} - o_t)] on channels: the difference puts the motion that
carries the action in its own channel, so a small network does not have to learn to subtract, and
the gain g makes that sparse channel loud enough to be found early in training.

Everything here is torch + numpy + pyarrow; the Parquet reading follows `workers/clips.py`
(`window_keys_of_split`): small columns of every file first, frames only of the rows kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers import schema as S
from workers.clips import parquet_files

IDM_VERSION = 1
"""Part of the cache key: bump it when the network or its training changes meaning."""
_WEIGHTS, _META = "idm.pt", "idm.json"


@dataclass(frozen=True)
class IDMConfig:
    pool: int = 2
    """Average-pooling factor on both axes: 2 gives 105x80 (must divide 210 and 160: 1, 2, 5, 10)."""
    grey: bool = False
    """Luma instead of RGB (3x fewer input channels; can merge equiluminant sprites with the background)."""
    diff_gain: float = 4.0
    """Scale of the o_{t+1} - o_t channel. The difference is a sprite's few pixels against zeros, a weak
    input next to the frames; amplified, the network finds it sooner (random Breakout, 150 steps:
    loss 0.78 with 4, 1.11 with 1, and at 1 a grey run sat on a constant guess)."""
    channels: tuple[int, ...] = (32, 64, 64)
    """Widths of the stride-2 convolutions (each halves H and W)."""
    hidden: int = 256
    """Width of the hidden layer of the classification head."""
    steps: int = 2000
    """Optimiser steps (batches drawn epoch by epoch from a seeded permutation)."""
    batch_size: int = 64
    """Pairs per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the initialisation, the batch order and the subset of pairs (`max_pairs`)."""
    max_pairs: int = 8192
    """At most this many training pairs (a seeded random subset); 2 raw frames = 200 KB a pair."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # JSON gives lists
        if self.pool < 1 or S.FRAME_SHAPE[0] % self.pool or S.FRAME_SHAPE[1] % self.pool:
            raise ValueError(f"IDMConfig.pool={self.pool}; must divide 210 and 160 (1, 2, 5 or 10)")
        if not self.channels or min(self.channels) < 1 or self.hidden < 1:
            raise ValueError(f"IDMConfig.channels={self.channels}, hidden={self.hidden}; need >= 1 each")
        for name in ("steps", "batch_size", "max_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"IDMConfig.{name}={getattr(self, name)}; must be >= 1")


def check_actions(actions: np.ndarray | Tensor, num_actions: int, what: str = "actions") -> None:
    """Raise ValueError naming the valid range unless every action is in 0..num_actions-1."""
    a = np.asarray(actions.cpu() if isinstance(actions, Tensor) else actions)
    bad = np.flatnonzero((a < 0) | (a >= num_actions))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what}: action {int(a.flat[i])} at index {i} is outside the valid range "
                         f"0..{num_actions - 1} (num_actions={num_actions}); drop NO_ACTION (-1) rows first")


def _check_frames(x, name: str) -> None:
    if tuple(x.shape[1:]) != S.FRAME_SHAPE or x.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"{name}: expected uint8 frames (N, {', '.join(map(str, S.FRAME_SHAPE))}), "
                         f"got {x.dtype} {tuple(x.shape)}")


def preprocess_frames(frames: Tensor, pool: int, grey: bool) -> Tensor:
    """uint8 (B, 210, 160, 3) -> float (B, C, 210/pool, 160/pool) in [0, 1] (C = 1 if grey else 3)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 210, 160)
    if grey:
        x = (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)  # (B, 1, H, W)
    return F.avg_pool2d(x, pool) if pool > 1 else x  # (B, C, h, w)


def pair_input(prev: Tensor, nxt: Tensor, pool: int, grey: bool, diff_gain: float) -> Tensor:
    """Raw uint8 frames o_t, o_{t+1} (B, 210, 160, 3) -> the network input [o_t, o_{t+1}, g (o_{t+1} - o_t)]
    float (B, 3C, 210/pool, 160/pool) (see the module docstring)."""
    x0, x1 = preprocess_frames(prev, pool, grey), preprocess_frames(nxt, pool, grey)  # (B, C, h, w) each
    return torch.cat([x0, x1, diff_gain * (x1 - x0)], dim=1)  # (B, 3C, h, w)


def pair_trunk(pool: int, grey: bool, channels: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """The stride-2 convolutions over `pair_input` -> (trunk, number of features it outputs, flattened)."""
    h, w = S.FRAME_SHAPE[0] // pool, S.FRAME_SHAPE[1] // pool
    layers, c_in = [], 3 * (1 if grey else 3)  # prev, next, next - prev
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
        c_in, h, w = c, h // 2, w // 2
    return nn.Sequential(*layers), c_in * h * w


class InverseDynamics(nn.Module):
    """A small CNN on a frame pair -> logits over the game's actions."""

    def __init__(self, cfg: IDMConfig, num_actions: int):
        super().__init__()
        self.cfg, self.num_actions = cfg, num_actions
        self.trunk, n_features = pair_trunk(cfg.pool, cfg.grey, cfg.channels)
        # flatten, not global pooling: where a sprite is (against a wall, say) decides what an action can do
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_features, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, num_actions))

    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 (B, 210, 160, 3) -> float (B, C, 210/pool, 160/pool) in [0, 1]."""
        return preprocess_frames(frames, self.cfg.pool, self.cfg.grey)

    def forward(self, prev: Tensor, nxt: Tensor) -> Tensor:
        """prev, nxt: uint8 (B, 210, 160, 3) raw frames o_t, o_{t+1} -> logits (B, A)."""
        return self.head(self.trunk(pair_input(prev, nxt, self.cfg.pool, self.cfg.grey, self.cfg.diff_gain)))


# ---------------------------------------------------------------- data

def _normalise_game(game: str) -> str:
    return game.removeprefix("ALE/").removesuffix("-v5")  # as workers.atari.game_name, without ALE


def _split_rows(data_root: str, game: str, split: str | None,
                extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """file index, row in file, episode id, step, action, env key of one game's rows (of a split), and
    the `extra` columns under their own names; "files" lists the Parquet files "file" indexes."""
    files = parquet_files(data_root)
    cols = [S.EPISODE_ID, S.STEP, S.ACTION, S.GAME, S.SPLIT, S.ENV_ID, S.ENV_CONFIG]
    cols += [c for c in extra if c not in cols]
    out: dict[str, list] = {k: [] for k in ("file", "row", "eid", "step", "action", "env", *extra)}
    for fi, f in enumerate(files):
        try:
            t = pq.read_table(f, columns=cols)
        except Exception as e:  # noqa: BLE001 - any reader failure names the file
            raise S.DatasetError(f"{f}: cannot read columns {cols}: {e}") from e
        mask = pc.equal(t[S.GAME], _normalise_game(game))
        if split is not None:
            mask = pc.and_(mask, pc.equal(t[S.SPLIT], split))
        rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if not len(rows):
            continue
        t = t.take(rows)
        out["file"].append(np.full(len(rows), fi))
        out["row"].append(rows)
        out["eid"].append(t[S.EPISODE_ID].to_numpy(zero_copy_only=False).astype(str))
        out["step"].append(t[S.STEP].to_numpy().astype(np.int64))
        out["action"].append(t[S.ACTION].to_numpy().astype(np.int64))
        env = np.char.add(np.char.add(t[S.ENV_ID].to_numpy(zero_copy_only=False).astype(str), "\x1f"),
                          t[S.ENV_CONFIG].to_numpy(zero_copy_only=False).astype(str))
        out["env"].append(env)
        for c in extra:
            out[c].append(t[c].to_numpy(zero_copy_only=False))
    res = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in out.items()}
    res["files"] = np.asarray(files, dtype=object)
    return res


def _num_actions_of(envs: np.ndarray, where: str) -> int:
    """The one action-space size of a set of "env_id\x1fenv_config" keys."""
    from workers.atari import num_actions  # the emulator is needed for this look-up only

    sizes = {num_actions(*e.split("\x1f")) for e in np.unique(envs)}
    if len(sizes) != 1:
        raise S.DatasetError(f"{where}: recorded in action spaces of sizes {sorted(sizes)}")
    return sizes.pop()


def dataset_num_actions(data_root: str, game: str) -> int:
    """Size of the action space the dataset records `game` in (from its env_id/env_config columns)."""
    return _num_actions_of(_game_envs(data_root, game), f"{data_root} game {game!r}")


def dataset_env(data_root: str, game: str) -> tuple[str, str]:
    """(env_id, env_config) that the dataset recorded `game` with (the first, if several)."""
    return tuple(_game_envs(data_root, game)[0].split("\x1f", 1))


def _game_envs(data_root: str, game: str) -> np.ndarray:
    envs = _split_rows(data_root, game, None)["env"]
    if not len(envs):
        raise ValueError(f"no rows of game {game!r} under data_root {data_root!r}")
    return envs


def pairs_from_dataset(data_root: str, game: str, split: str, max_pairs: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive-step pairs of one split of one game -> (prev uint8 (N, 210, 160, 3), nxt uint8
    (N, 210, 160, 3), actions int64 (N,)), actions[i] taken at prev[i] giving nxt[i]. Rows of the
    NO_ACTION sentinel (an episode's last frame) start no pair. At most `max_pairs`, a random subset
    drawn with `seed`; pairs come in (episode, step) order. Frames are read only for the rows kept.
    A split without pairs raises ValueError naming data_root, game and split."""
    r, prev, nxt = split_pairs(data_root, game, split)
    if max_pairs is not None and len(prev) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(prev), max_pairs, replace=False))
        prev, nxt = prev[keep], nxt[keep]
    actions = r["action"][prev]
    where = f"data_root {data_root!r} game {game!r} split {split!r}"
    check_actions(actions, _num_actions_of(r["env"][prev], where), where)
    frames_prev, frames_nxt = read_frames(r, prev, nxt)
    return frames_prev, frames_nxt, actions


class NoPairsError(ValueError):
    """A split of a game holds no consecutive-step pair (e.g. no `val` episodes in two-split data)."""


def split_pairs(data_root: str, game: str, split: str, extra: tuple[str, ...] = ()
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The consecutive-step pairs of one split of one game, without their frames: (rows, prev, nxt)
    with rows as `_split_rows` gives them (`extra` columns included) and prev, nxt int64 (N,) the
    indices into rows of each pair's o_t and o_{t+1} row, in (episode, step) order. Rows of the
    NO_ACTION sentinel (an episode's last frame) start no pair. A split without pairs raises
    NoPairsError (a ValueError) naming data_root, game and split."""
    if split not in S.SPLITS:
        raise ValueError(f"split must be one of {S.SPLITS}, got {split!r}")
    r = _split_rows(data_root, game, split, extra)
    order = np.lexsort((r["step"], r["eid"]))
    eid, step, act = r["eid"][order], r["step"][order], r["action"][order]
    ok = (eid[:-1] == eid[1:]) & (step[1:] == step[:-1] + 1) & (act[:-1] != S.NO_ACTION)
    first = np.flatnonzero(ok)  # (N,) sorted position of each pair's prev row
    if not len(first):
        raise NoPairsError(f"no frame pairs of game {game!r} in split {split!r} under data_root "
                         f"{data_root!r} ({len(order)} rows of that game and split)")
    return r, order[first], order[first + 1]


def read_frames(r: dict[str, np.ndarray], *indices: np.ndarray) -> tuple[np.ndarray, ...]:
    """Frames uint8 (N, 210, 160, 3) of rows `r` (from `split_pairs`) at each array of indices, reading
    the frame column of each file involved once."""
    out = [np.empty((len(idx), *S.FRAME_SHAPE), np.uint8) for idx in indices]
    for fi in np.unique(r["file"][np.concatenate(indices)]):
        path = str(r["files"][fi])
        frames = S.frames_from_arrow(pq.read_table(path, columns=[S.FRAME])[S.FRAME], path)
        for o, idx in zip(out, indices, strict=True):
            here = r["file"][idx] == fi
            o[here] = frames[r["row"][idx[here]]]
    return tuple(out)


def generated_pairs(cond_last, generated):
    """A rollout's pairs for the IDM: cond_last uint8 (B, 210, 160, 3), generated uint8 (B, T, 210,
    160, 3) -> (prev (B*T, ...), nxt (B*T, ...), frame_index (B*T,)), rollout-major: row b*T + k is
    (generated[b, k-1], or cond_last[b] for k = 0; generated[b, k]) with frame_index k. Label the rows
    with the rollout's future actions a_t..a_{t+T-1} (`evaluate.window_actions(..., "future")`)
    flattened the same way. numpy arrays or torch tensors (the output follows the input)."""
    if cond_last.ndim != 4 or generated.ndim != 5 or generated.shape[0] != cond_last.shape[0] \
            or tuple(generated.shape[2:]) != tuple(cond_last.shape[1:]):
        raise ValueError(f"cond_last (B, H, W, 3) and generated (B, T, H, W, 3) must agree on B, H, W; got "
                         f"{tuple(cond_last.shape)} and {tuple(generated.shape)}")
    B, T = generated.shape[:2]
    if isinstance(generated, Tensor):
        prev = torch.cat([cond_last[:, None], generated[:, :-1]], dim=1)  # (B, T, H, W, 3)
        index = torch.arange(T, device=generated.device).repeat(B)  # (B*T,)
    else:
        prev = np.concatenate([cond_last[:, None], generated[:, :-1]], axis=1)  # (B, T, H, W, 3)
        index = np.tile(np.arange(T), B)  # (B*T,)
    return prev.reshape(B * T, *prev.shape[2:]), generated.reshape(B * T, *generated.shape[2:]), index


# ---------------------------------------------------------------- training and scores

def _to_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def seeded_init(seed: int, build):
    """`build()` (a module) under torch seed `seed`, leaving the caller's global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int, steps: int):
    """`steps` sorted index batches of 0..n-1, drawn epoch by epoch from permutations of `rng` (an
    epoch's last, short batch is dropped when a full one no longer fits and the epoch has begun)."""
    perm, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > len(perm) and pos > 0:  # next epoch
            perm, pos = rng.permutation(n), 0
        yield np.sort(perm[pos:pos + batch_size])
        pos += batch_size


def fit(model: nn.Module, batches, batch_loss, lr: float, weight_decay: float) -> list[float]:
    """AdamW over `batches` (index arrays): one step of `batch_loss(idx)` (a scalar tensor) each.
    Returns the losses; leaves the model in train mode on its device."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for idx in batches:
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_idm(cfg: IDMConfig, prev: np.ndarray, nxt: np.ndarray, actions: np.ndarray,
              num_actions: int, device: str = "cpu") -> tuple[InverseDynamics, dict]:
    """Train an IDM on real pairs (on `device`); the same inputs and seed give the same weights (CPU).
    Returns the model (eval mode, on CPU) and info: steps, seconds, final loss, class counts and loss
    weights."""
    _check_frames(prev, "prev"), _check_frames(nxt, "nxt")
    actions = np.asarray(actions, dtype=np.int64)
    if not (len(prev) == len(nxt) == len(actions)) or not len(actions):
        raise ValueError(f"train_idm: {len(prev)} prev, {len(nxt)} nxt frames and {len(actions)} actions; "
                         "need the same number, at least one")
    check_actions(actions, num_actions, "train_idm")
    counts = np.bincount(actions, minlength=num_actions)
    # Class-balanced loss. A PPO policy plays a few actions most of the time; unweighted cross-entropy
    # then learns the policy's prior and guesses the frequent action whenever the frames are not
    # decisive, e.g. on a pair where nothing moved. That is exactly the pair a world model that ignores
    # its actions produces, so a prior-leaning IDM would credit it with the majority share. Weights
    # n / (K * count) make every present action count alike (absent actions get 0), so the IDM decides
    # from the frames, and its macro-F1 is what it is trained for.
    present = counts > 0
    weight = np.where(present, len(actions) / (present.sum() * np.maximum(counts, 1)), 0.0)
    t0 = time.time()
    model = seeded_init(cfg.seed, lambda: InverseDynamics(cfg, num_actions)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32, device=device))

    def batch_loss(idx: np.ndarray) -> Tensor:
        logits = model(_to_tensor(prev[idx]).to(device), _to_tensor(nxt[idx]).to(device))  # (b, A)
        return loss_fn(logits, torch.from_numpy(actions[idx]).to(device))

    batches = epoch_batches(np.random.default_rng(cfg.seed), len(actions), cfg.batch_size, cfg.steps)
    losses = fit(model, batches, batch_loss, cfg.lr, cfg.weight_decay)
    model = model.cpu().eval()
    info = dict(steps=cfg.steps, seconds=time.time() - t0, pairs=len(actions),
                loss=float(np.mean(losses[-50:])), class_counts=counts.tolist(), class_weights=weight.tolist())
    return model, info


@torch.no_grad()
def idm_predict(model: InverseDynamics, prev, nxt, batch_size: int = 256) -> np.ndarray:
    """Predicted action (N,) int64 of each pair (numpy or torch uint8 frames (N, 210, 160, 3))."""
    _check_frames(prev, "prev"), _check_frames(nxt, "nxt")
    if len(prev) != len(nxt):
        raise ValueError(f"idm_predict: {len(prev)} prev frames but {len(nxt)} nxt frames")
    model.eval()
    device = next(model.parameters()).device
    out = [model(_to_tensor(prev[i:i + batch_size]).to(device), _to_tensor(nxt[i:i + batch_size]).to(device))
           .argmax(-1).cpu() for i in range(0, len(prev), batch_size)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def scores_from_predictions(pred: np.ndarray, actions: np.ndarray, num_actions: int) -> dict:
    """accuracy, macro_f1, f1 per action (A,) (nan for an action absent from the labels), confusion
    (A, A) int64 with rows = true action and columns = predicted, n, and majority_share: the accuracy
    of always guessing the most frequent true action (the constant-guess baseline).

    macro_f1 averages F1 over the actions PRESENT in the true labels: an action nobody took has no
    recall to speak of, and averaging in its 0 would make scores of test sets with different action
    mixes incomparable. Predicting an absent action still costs: it is a miss of the true one."""
    pred, actions = np.asarray(pred, np.int64), np.asarray(actions, np.int64)
    check_actions(actions, num_actions, "labels")
    check_actions(pred, num_actions, "predictions")
    conf = np.bincount(actions * num_actions + pred, minlength=num_actions ** 2).reshape(num_actions, num_actions)
    tp, support, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.where(support > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    n = int(len(actions))
    return dict(accuracy=float(tp.sum() / n) if n else float("nan"),
                macro_f1=float(np.nanmean(f1)) if n else float("nan"), f1=f1, confusion=conf, n=n,
                majority_share=float(support.max() / n) if n else float("nan"))


def idm_scores(model: InverseDynamics, prev, nxt, actions, num_actions: int) -> dict:
    """The IDM's scores on labelled pairs (see `scores_from_predictions` for the keys)."""
    return scores_from_predictions(idm_predict(model, prev, nxt), np.asarray(actions), num_actions)


def scores_by_frame(model: InverseDynamics, cond_last, generated, future_actions, num_actions: int) -> dict:
    """Action fidelity of rollouts: `generated_pairs` labelled with future_actions (B, T) -> {"all": scores,
    "per_frame": [scores of generated frame k for k in 0..T-1]}."""
    prev, nxt, index = generated_pairs(cond_last, generated)
    labels = np.asarray(future_actions.cpu() if isinstance(future_actions, Tensor) else future_actions)
    if labels.shape != tuple(generated.shape[:2]):
        raise ValueError(f"future_actions {labels.shape} must be (B, T) = {tuple(generated.shape[:2])}")
    labels, index = labels.reshape(-1), np.asarray(index.cpu() if isinstance(index, Tensor) else index)
    pred = idm_predict(model, prev, nxt)
    return {"all": scores_from_predictions(pred, labels, num_actions),
            "per_frame": [scores_from_predictions(pred[index == k], labels[index == k], num_actions)
                          for k in range(generated.shape[1])]}


# ---------------------------------------------------------------- persistence

def save_idm(path: str, model: InverseDynamics, cfg: IDMConfig, meta: dict | None = None) -> None:
    """Weights (`idm.pt`) and config + num_actions + meta (`idm.json`) into directory `path`."""
    os.makedirs(path, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(path, _WEIGHTS))
    doc = dict(version=IDM_VERSION, num_actions=model.num_actions, config=asdict(cfg), meta=meta or {})
    with open(os.path.join(path, _META), "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)


def load_idm(path: str, device: str = "cpu") -> tuple[InverseDynamics, IDMConfig, dict]:
    """(model in eval mode, config, meta) saved by `save_idm`."""
    with open(os.path.join(path, _META)) as f:
        doc = json.load(f)
    cfg = IDMConfig(**doc["config"])
    model = InverseDynamics(cfg, int(doc["num_actions"]))
    model.load_state_dict(torch.load(os.path.join(path, _WEIGHTS), map_location=device, weights_only=True))
    return model.to(device).eval(), cfg, doc["meta"]


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in idm.json")


def cache_key(data_root: str, game: str, cfg: IDMConfig) -> str:
    """Hash of the collection (every Parquet file's path under data_root and its size), the game, the
    config and IDM_VERSION: a new or re-collected file, or another setting, trains a new IDM."""
    files = [(os.path.relpath(f, data_root) if os.path.isdir(data_root) else os.path.basename(f),
              os.path.getsize(f)) for f in parquet_files(data_root)]
    doc = json.dumps(dict(files=files, game=_normalise_game(game), cfg=asdict(cfg), version=IDM_VERSION),
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def real_pair_scores(model: InverseDynamics, data_root: str, game: str, split: str, cfg: IDMConfig) -> dict:
    """The IDM's scores on a split's real pairs: the ceiling for generated ones."""
    ep, en, ea = pairs_from_dataset(data_root, game, split, cfg.max_pairs, cfg.seed)
    s = idm_scores(model, ep, en, ea, dataset_num_actions(data_root, game))
    return dict(split=split, **{k: s[k] for k in ("accuracy", "macro_f1", "majority_share", "n")},
                confusion=s["confusion"].tolist())


def cached_idm(data_root: str, game: str, cfg: IDMConfig, cache_dir: str, *,
               eval_split: str | None = None, device: str = "cpu") -> tuple[InverseDynamics, dict]:
    """The IDM of a collection's game: loaded from `cache_dir/<game>-<cache_key>` when present, else
    trained on the train split, scored on `eval_split` when given (the real-pair ceiling, stored in
    meta["eval"]) and saved there (written aside and renamed in, so concurrent callers never read half
    a cache). Returns (model on `device`, meta); meta["trained"] says whether this call trained it, and
    meta["path"] where it is (`load_idm`)."""
    game = _normalise_game(game)
    target = os.path.join(cache_dir, f"{game}-{cache_key(data_root, game, cfg)}")
    if os.path.exists(os.path.join(target, _META)):
        model, _, meta = load_idm(target, device)
        if eval_split is not None and meta.get("eval", {}).get("split") != eval_split:
            meta = {**meta, "eval": real_pair_scores(model, data_root, game, eval_split, cfg)}  # not cached: another split
        return model, {**meta, "trained": False, "path": target}
    n_act = dataset_num_actions(data_root, game)
    prev, nxt, actions = pairs_from_dataset(data_root, game, "train", cfg.max_pairs, cfg.seed)
    model, info = train_idm(cfg, prev, nxt, actions, n_act, device=device)
    del prev, nxt
    meta = dict(data_root=os.path.abspath(data_root), game=game, train=info)
    if eval_split is not None:
        meta["eval"] = real_pair_scores(model, data_root, game, eval_split, cfg)
    tmp = os.path.join(cache_dir, f".tmp-{uuid.uuid4().hex[:8]}")
    save_idm(tmp, model, cfg, meta)
    try:
        os.rename(tmp, target)
    except OSError:  # another caller got there first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(device), {**meta, "trained": True, "path": target}
