"""Reward and termination heads: what a transition o_t -> o_{t+1} earned, and whether it ended a life or the game.

The world model generates frames only. An agent acting inside it (the imagination env,
`workers/imagination.py`) also needs, for every generated transition, its reward, whether a life was
lost and whether the game is over. A small CNN on the frame pair (o_t, o_{t+1}) predicts them:

    reward     the sign of r_t, three classes -1 / 0 / +1
    life_lost  lives_{t+1} < lives_t
    game_over  o_{t+1} is the last frame of an episode that terminated (not one cut by a time limit)

Frames, not latents. The heads read raw uint8 frames, so they do not depend on the VAE: they train
and are checked on real frames of the collection (`heads_scores` on the test split is their
ceiling), any VAE or DiT can use them, and generated frames are read exactly as real ones.

Input and network are those of the inverse-dynamics model (`workers/inverse_dynamics.py`): frames
average-pooled 2x2 to 105x80 RGB, which keeps the smallest sprites (a 2x4-px ball), the pair as
[o_t, o_{t+1}, g (o_{t+1} - o_t)] on channels, stride-2 convolutions and a flattened hidden layer
(score digits and lives counters sit at fixed places, so position matters), then three heads.

Rare events. Rewards, life losses and game overs are a few per cent of the transitions or fewer (a
random Breakout player scores about once in 130 steps and ends a game once in 200). Training keeps
every event pair of the train split (up to `max_pairs`) and draws each batch half from event pairs
(`positive_fraction`, the three kinds of event in equal shares) and half uniformly, so every batch
shows positives. That oversampling inflates the predicted probabilities; the logits are shifted by
the log ratio of each label's rate in the train split to its rate in the training batches (a
prior-shift correction, exact when the oversampling depends on that label alone), so that
probabilities speak of the data again. The decision thresholds are then chosen on the val split as
the ones of maximum F1 (one per event: non-zero reward, life loss, game over). Quality is reported
as precision, recall and F1 of each event, never as accuracy: "never" is 99 % accurate.

Reward as a sign. PPO clips rewards to their sign, so the sign is what the agent learns from; three
classes also learn from few examples where regressing Breakout's 1/4/7 would not. `predict` returns
for a predicted non-zero sign the mean reward of that sign on the train split (Breakout's bricks of
1, 4 and 7 points average to one value) and 0.0 otherwise. An event or a sign that the train split
never shows (Pong loses no lives, Breakout gives no negative reward) is never predicted.

What a pair cannot show. The labels come from the emulator, not the screen, and some events leave
no trace in the frames: Breakout ends the game on its last lost ball without redrawing anything (in
random play 11 of 15 game-over pairs have o_{t+1} identical to o_t), so no pair model detects those,
and the game-over scores on val and test show it. The heads do not force game_over to imply
life_lost either; a caller that needs that can combine the two.

Splits without val (data collected before the val split existed) still train: the thresholds stay
at 0.5 on the corrected probabilities, and the report says so. Frames of the wrong dtype or shape
raise ValueError naming the expected (N, 210, 160, 3) uint8.

On disk the heads live in the world-model folder, `<world_model_dir>/heads/`: `heads.pt` (weights)
and `heads.json` (config, thresholds, per-sign reward values, logit shifts, game, data used).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers import schema as S
from workers.inverse_dynamics import (
    NoPairsError,
    _check_frames,
    _normalise_game,
    _to_tensor,
    fit,
    pair_input,
    pair_trunk,
    read_frames,
    seeded_init,
    split_pairs,
)

HEADS_VERSION = 1
"""Stored in heads.json: bump it when the network or the meaning of its outputs changes."""
HEADS_DIR, _WEIGHTS, _META = "heads", "heads.pt", "heads.json"
TRAIN_COMMAND = "python pipeline/run_all.py --preset <preset> --stages imagine"
REWARD_SIGNS = (-1, 0, 1)
"""Reward classes in logit order: class c is the sign REWARD_SIGNS[c]."""
EVENTS = ("reward", "life_lost", "game_over")
"""The three events scored: non-zero reward, life loss, game over."""
LABEL_COLUMNS = (S.REWARD, S.LIVES, S.TERMINATED)
_EVAL_BATCH = 256


@dataclass(frozen=True)
class RewardModelConfig:
    pool: int = 2
    """Average-pooling factor on both axes: 2 gives 105x80 (must divide 210 and 160: 1, 2, 5, 10)."""
    grey: bool = False
    """Luma instead of RGB (3x fewer input channels; can merge equiluminant sprites with the background)."""
    diff_gain: float = 4.0
    """Scale of the o_{t+1} - o_t channel: a score digit or a lost ball is a few pixels, amplified so that
    the network finds them early (as in `IDMConfig.diff_gain`)."""
    channels: tuple[int, ...] = (32, 64, 64)
    """Widths of the stride-2 convolutions (each halves H and W)."""
    hidden: int = 256
    """Width of the hidden layer the three heads share."""
    steps: int = 2000
    """Optimiser steps (each a batch drawn by the balanced sampler)."""
    batch_size: int = 64
    """Pairs per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the initialisation, the subset of pairs (`max_pairs`), the batches and the eval subset."""
    max_pairs: int = 8192
    """At most this many training pairs in memory (2 raw frames = 200 KB a pair): every event pair
    (non-zero reward, life loss or game over) first, then a seeded random subset of the others."""
    positive_fraction: float = 0.5
    """Expected share of each batch drawn from event pairs (the present kinds of event in equal shares);
    the rest is drawn uniformly from all training pairs. 0 = uniform batches. In [0, 1)."""
    eval_pairs: int = 0
    """At most this many val or test pairs are scored (a seeded uniform subset, which keeps the split's
    event rates); 0 scores them all. Frames are read file by file, so memory does not grow with it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # JSON gives lists
        if self.pool < 1 or S.FRAME_SHAPE[0] % self.pool or S.FRAME_SHAPE[1] % self.pool:
            raise ValueError(f"RewardModelConfig.pool={self.pool}; must divide 210 and 160 (1, 2, 5 or 10)")
        if not self.channels or min(self.channels) < 1 or self.hidden < 1:
            raise ValueError(f"RewardModelConfig.channels={self.channels}, hidden={self.hidden}; need >= 1 each")
        for name in ("steps", "batch_size", "max_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"RewardModelConfig.{name}={getattr(self, name)}; must be >= 1")
        if not self.lr > 0 or not self.weight_decay >= 0 or not math.isfinite(self.diff_gain):
            raise ValueError(f"RewardModelConfig lr={self.lr}, weight_decay={self.weight_decay}, diff_gain="
                             f"{self.diff_gain}; need lr > 0, weight_decay >= 0 and a finite diff_gain")
        if not 0 <= self.positive_fraction < 1:
            raise ValueError(f"RewardModelConfig.positive_fraction={self.positive_fraction}; must be in [0, 1)")
        if self.eval_pairs < 0:
            raise ValueError(f"RewardModelConfig.eval_pairs={self.eval_pairs}; must be >= 0 (0 = all pairs)")


class RewardTerminationModel(nn.Module):
    """A small CNN on a frame pair -> reward-sign logits and life-loss and game-over logits."""

    def __init__(self, cfg: RewardModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk, n_features = pair_trunk(cfg.pool, cfg.grey, cfg.channels)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_features, cfg.hidden), nn.ReLU())
        self.reward = nn.Linear(cfg.hidden, len(REWARD_SIGNS))
        self.life_lost = nn.Linear(cfg.hidden, 1)
        self.game_over = nn.Linear(cfg.hidden, 1)

    def forward(self, prev: Tensor, nxt: Tensor) -> dict[str, Tensor]:
        """prev, nxt: uint8 (B, 210, 160, 3) raw frames o_t, o_{t+1} -> {"reward": (B, 3) logits over the
        signs -1 / 0 / +1, "life_lost": (B,) logit, "game_over": (B,) logit}. The logits are those of the
        training batches; `RewardHeads` corrects them for the oversampling."""
        _check_pair(prev, nxt)
        z = self.body(self.trunk(pair_input(prev, nxt, self.cfg.pool, self.cfg.grey, self.cfg.diff_gain)))
        return {"reward": self.reward(z), "life_lost": self.life_lost(z)[:, 0], "game_over": self.game_over(z)[:, 0]}


def _check_pair(prev, nxt) -> None:
    for x, name in ((prev, "prev"), (nxt, "nxt")):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected uint8 frames (N, {', '.join(map(str, S.FRAME_SHAPE))}) as a numpy "
                             f"array or torch tensor, got {type(x).__name__}")
        _check_frames(x, name)
    if len(prev) != len(nxt):
        raise ValueError(f"{len(prev)} prev frames but {len(nxt)} nxt frames; expected one nxt per prev")


# ---------------------------------------------------------------- labels

def _labelled_pairs(data_root: str, game: str, split: str):
    """(rows, prev, nxt, labels) of every pair of a split (see `split_pairs`; labels as `pair_labels`)."""
    r, prev, nxt = split_pairs(data_root, _normalise_game(game), split, LABEL_COLUMNS)
    episodes, inv = np.unique(r["eid"], return_inverse=True)
    last_step = np.full(len(episodes), np.iinfo(np.int64).min)
    np.maximum.at(last_step, inv, r["step"])
    is_last = r["step"] == last_step[inv]  # (rows,) the episode's last row
    labels = dict(reward=r[S.REWARD][prev].astype(np.float32),
                  life_lost=r[S.LIVES][nxt].astype(np.int64) < r[S.LIVES][prev].astype(np.int64),
                  game_over=is_last[nxt] & r[S.TERMINATED][nxt].astype(bool))
    return r, prev, nxt, labels


def pair_labels(data_root: str, game: str, split: str) -> dict[str, np.ndarray]:
    """Labels of every consecutive-step pair (row t, row t+1) of one episode of a split, in (episode,
    step) order: episode_id str, step int64 (t), reward float32 (r_t, the reward of the action at row
    t), life_lost bool (lives_{t+1} < lives_t), game_over bool (row t+1 is the episode's last row and
    is `terminated`). No frame is read. A split without pairs raises ValueError."""
    r, prev, _, labels = _labelled_pairs(data_root, game, split)
    return dict(episode_id=r["eid"][prev], step=r["step"][prev], **labels)


def _events(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The three events of `EVENTS` as bool (N,) each."""
    return dict(reward=labels["reward"] != 0, life_lost=labels["life_lost"], game_over=labels["game_over"])


def _sign_class(reward: np.ndarray) -> np.ndarray:
    return np.sign(reward).astype(np.int64) + 1  # -1, 0, +1 -> 0, 1, 2


def _counts(labels: dict[str, np.ndarray]) -> dict[str, int]:
    r = labels["reward"]
    return dict(pairs=len(r), reward_neg=int((r < 0).sum()), reward_pos=int((r > 0).sum()),
                life_lost=int(labels["life_lost"].sum()), game_over=int(labels["game_over"].sum()))


# ---------------------------------------------------------------- sampling

def training_subset(labels: dict[str, np.ndarray], max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most `max_pairs` pairs: every event pair (a seeded subset of them if they alone
    exceed max_pairs), then a seeded random subset of the other pairs."""
    event = np.logical_or.reduce(list(_events(labels).values()))
    pos, neg = np.flatnonzero(event), np.flatnonzero(~event)
    if len(pos) > max_pairs:
        pos = rng.choice(pos, max_pairs, replace=False)
    if len(neg) > max_pairs - len(pos):
        neg = rng.choice(neg, max_pairs - len(pos), replace=False)
    return np.sort(np.concatenate([pos, neg]))


def sampling_probabilities(labels: dict[str, np.ndarray], positive_fraction: float) -> np.ndarray:
    """Probability (N,) of drawing each pair for a batch slot: with probability `positive_fraction` a kind
    of event (uniform over the kinds present) then one of its pairs (uniform), else any pair (uniform)."""
    kinds = [e for e in _events(labels).values() if e.any()]
    n = len(labels["reward"])
    f = positive_fraction if kinds else 0.0
    q = np.full(n, (1.0 - f) / n)
    for e in kinds:
        q += f / len(kinds) * e / e.sum()
    return q / q.sum()


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def prior_shift(data: dict[str, np.ndarray], batch: dict[str, np.ndarray], q: np.ndarray) -> dict:
    """Logit shifts that turn the probabilities of the training batches into those of the data: for each
    reward sign log(rate in data / rate in batches), for each binary event logit(data rate) - logit(batch
    rate); `data` are the labels of the whole train split, `batch` those of the training pairs drawn with
    probabilities q. None where the data or the batches never show that sign or event: never predicted."""
    rc, bc = _sign_class(data["reward"]), _sign_class(batch["reward"])
    reward = []
    for c in range(len(REWARD_SIGNS)):
        p_data, p_batch = float(np.mean(rc == c)), float(q[bc == c].sum())
        reward.append(math.log(p_data / p_batch) if p_data > 0 and p_batch > 0 else None)
    out = dict(reward=reward)
    for k in ("life_lost", "game_over"):
        p_data, p_batch = float(np.mean(data[k])), float(q[batch[k]].sum())
        out[k] = _logit(p_data) - _logit(p_batch) if p_data > 0 and p_batch > 0 else None
    return out


# ---------------------------------------------------------------- the heads

class RewardHeads:
    """A trained `RewardTerminationModel` with what inference needs: the logit shifts of the
    oversampling (`prior_shift`), one decision threshold per event, and the reward value of each sign.

    thresholds: {"reward": on P(sign != 0), "life_lost": on P(life lost), "game_over": on P(game over)}.
    reward_values: (value of sign -1, 0.0, value of sign +1); None for a sign the train split never
    showed. threshold_source says where each threshold came from (val max-F1 or a default)."""

    def __init__(self, model: RewardTerminationModel, *, thresholds: dict[str, float],
                 reward_values: tuple[float | None, float, float | None], shift: dict, game: str,
                 threshold_source: dict[str, str] | None = None, train_counts: dict | None = None,
                 data: dict | None = None, meta: dict | None = None):
        self.model, self.cfg = model.eval(), model.cfg
        self.thresholds = {k: float(thresholds[k]) for k in EVENTS}
        self.reward_values = tuple(None if v is None else float(v) for v in reward_values)
        self.shift, self.game = shift, game
        self.threshold_source = dict(threshold_source or {k: "default 0.5" for k in EVENTS})
        self.train_counts, self.data, self.meta = dict(train_counts or {}), dict(data or {}), dict(meta or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> RewardHeads:
        self.model.to(device)
        return self

    def enabled(self, event: str) -> bool:
        """Whether the heads can predict `event` at all (the train split showed it)."""
        if event == "reward":
            return any(self.shift["reward"][c] is not None for c in (0, 2))
        return self.shift[event] is not None

    @torch.no_grad()
    def probabilities(self, prev, nxt) -> dict[str, np.ndarray]:
        """Probabilities under the data's event rates: {"reward": float32 (B, 3) over the signs -1 / 0 / +1,
        "life_lost": (B,), "game_over": (B,)}, frames as in `predict`. An event or sign never seen in
        training has probability 0."""
        _check_pair(prev, nxt)
        self.model.eval()
        dev = self.device
        reward_shift = torch.tensor([-math.inf if s is None else s for s in self.shift["reward"]], device=dev)
        out: dict[str, list] = {k: [] for k in EVENTS}
        for i in range(0, len(prev), _EVAL_BATCH):
            a, b = prev[i:i + _EVAL_BATCH], nxt[i:i + _EVAL_BATCH]
            logits = self.model(_to_tensor(a).to(dev), _to_tensor(b).to(dev))
            out["reward"].append(torch.softmax(logits["reward"].float() + reward_shift, -1).cpu())
            for k in ("life_lost", "game_over"):
                s = self.shift[k]
                p = torch.zeros_like(logits[k]) if s is None else torch.sigmoid(logits[k].float() + s)
                out[k].append(p.cpu())
        empty = {"reward": np.zeros((0, len(REWARD_SIGNS)), np.float32)}
        return {k: torch.cat(v).numpy().astype(np.float32) if v else empty.get(k, np.zeros(0, np.float32))
                for k, v in out.items()}

    def sign(self, p_reward: np.ndarray) -> np.ndarray:
        """The sign (B,) int64, -1 or +1, that a non-zero reward gets from reward probabilities (B, 3): the
        likelier one of the signs seen in training."""
        neg, pos = (self.shift["reward"][c] is not None for c in (0, 2))
        if not (neg and pos):
            return np.full(len(p_reward), 1 if pos else -1, np.int64)
        return np.where(p_reward[:, 2] >= p_reward[:, 0], 1, -1).astype(np.int64)

    def decide(self, probs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`probabilities` -> (reward float32 (B,), life_lost bool (B,), game_over bool (B,)) under the thresholds."""
        p = probs["reward"]
        nonzero = (p[:, 0] + p[:, 2] >= self.thresholds["reward"]) & self.enabled("reward")
        values = np.array([0.0 if v is None else v for v in self.reward_values], np.float32)
        reward = np.where(nonzero, values[self.sign(p) + 1], 0.0).astype(np.float32)
        life = (probs["life_lost"] >= self.thresholds["life_lost"]) & self.enabled("life_lost")
        over = (probs["game_over"] >= self.thresholds["game_over"]) & self.enabled("game_over")
        return reward, life, over

    def predict(self, prev, nxt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """prev, nxt: uint8 (B, 210, 160, 3) numpy arrays or torch tensors (any device), the frames o_t and
        o_{t+1} of B transitions -> (reward float32 (B,), life_lost bool (B,), game_over bool (B,)). The
        reward is the train split's mean reward of the predicted sign, 0.0 where no reward is predicted."""
        return self.decide(self.probabilities(prev, nxt))


def _reward_values(reward: np.ndarray) -> tuple[float | None, float, float | None]:
    """(mean of the negative rewards, 0.0, mean of the positive rewards); None for a sign absent."""
    neg, pos = reward[reward < 0], reward[reward > 0]
    return (float(neg.mean()) if len(neg) else None, 0.0, float(pos.mean()) if len(pos) else None)


# ---------------------------------------------------------------- training

def train_heads(cfg: RewardModelConfig, data_root: str, game: str, log: Callable[[str], None] = print,
                device: str = "cpu") -> tuple[RewardHeads, dict]:
    """Train the heads on the train split's real pairs of `game` (on `device`), choose the thresholds
    on the val split (maximum F1 of each event) and return (heads on CPU, report). Without val pairs
    (two-split data) the thresholds stay 0.5 and report["warnings"] says so. The report holds the
    config, the label counts of the train split and of the pairs trained on, the final loss, the
    thresholds and their sources, and the val scores at the chosen thresholds (`heads_scores`)."""
    game = _normalise_game(game)
    t0, warnings = time.time(), []
    r, prev, nxt, labels = _labelled_pairs(data_root, game, "train")
    rng = np.random.default_rng(cfg.seed)
    keep = training_subset(labels, cfg.max_pairs, rng)
    y = {k: v[keep] for k, v in labels.items()}
    counts, used = _counts(labels), _counts(y)
    log(f"[reward heads] {game}: {counts['pairs']} train pairs, {used['pairs']} used; rewards -/+ "
        f"{counts['reward_neg']}/{counts['reward_pos']}, life losses {counts['life_lost']}, game overs "
        f"{counts['game_over']}")
    for k, n in (("non-zero reward", counts["reward_neg"] + counts["reward_pos"]),
                 ("life loss", counts["life_lost"]), ("game over", counts["game_over"])):
        if not n:
            warnings.append(f"no {k} in the train split: the heads never predict one")
    q = sampling_probabilities(y, cfg.positive_fraction)
    model, losses = _fit_heads(cfg, read_frames(r, prev[keep], nxt[keep]), y, q, rng, device)
    heads = RewardHeads(model, thresholds={k: 0.5 for k in EVENTS}, reward_values=_reward_values(labels["reward"]),
                        shift=prior_shift(labels, y, q), game=game, train_counts=dict(split=counts, used=used),
                        data=dict(data_root=os.path.abspath(data_root), train_pairs=counts["pairs"],
                                  used_pairs=used["pairs"]))
    train_info = dict(steps=cfg.steps, seconds=time.time() - t0, loss=float(np.mean(losses[-50:])),
                      counts=counts, used=used)
    log(f"[reward heads] trained {cfg.steps} steps in {train_info['seconds']:.1f} s, loss {train_info['loss']:.4f}")

    heads.to(device)
    try:
        val_labels, val_probs, val_n = _split_probabilities(heads, data_root, game, "val")
    except NoPairsError:
        val_labels = None
        warnings.append(f"no val pairs of {game} under {data_root} (data without a val split): "
                        "thresholds not tuned, 0.5 on the corrected probabilities")
        heads.threshold_source = {k: "default 0.5: no val split" for k in EVENTS}
    val_scores = None
    if val_labels is not None:
        scores = dict(reward=val_probs["reward"][:, 0] + val_probs["reward"][:, 2],
                      life_lost=val_probs["life_lost"], game_over=val_probs["game_over"])
        for k, positive in _events(val_labels).items():
            if not heads.enabled(k):
                heads.threshold_source[k] = "default 0.5: never predicted (no positives in train)"
            elif not positive.any():
                heads.threshold_source[k] = "default 0.5: no positives in val"
            else:
                heads.thresholds[k] = max_f1_threshold(scores[k], positive)
                heads.threshold_source[k] = f"val max-F1 ({int(positive.sum())} positives)"
        val_scores = _scores(heads, val_labels, val_probs, "val", val_n)
        heads.data["val_pairs"] = val_scores["n"]
    heads.to("cpu")
    for w in warnings:
        log(f"[reward heads] WARNING: {w}")
    log(f"[reward heads] thresholds {heads.thresholds} ({heads.threshold_source})")
    report = dict(game=game, data_root=os.path.abspath(data_root), config=asdict(cfg), train=train_info,
                  thresholds=dict(heads.thresholds), threshold_source=dict(heads.threshold_source),
                  reward_values=list(heads.reward_values), shift=heads.shift, val=val_scores,
                  warnings=warnings)
    return heads, report


def _fit_heads(cfg: RewardModelConfig, frames: tuple[np.ndarray, np.ndarray], y: dict[str, np.ndarray],
               q: np.ndarray, rng: np.random.Generator, device: str) -> tuple[RewardTerminationModel, list[float]]:
    """A seeded model trained on frames (prev, nxt) with labels y, batches drawn with probabilities q
    -> (model in eval mode on CPU, losses). The frames are released on return."""
    targets = dict(reward=torch.from_numpy(_sign_class(y["reward"])),
                   life_lost=torch.from_numpy(y["life_lost"].astype(np.float32)),
                   game_over=torch.from_numpy(y["game_over"].astype(np.float32)))
    model = seeded_init(cfg.seed, lambda: RewardTerminationModel(cfg)).to(device)

    def batch_loss(idx: np.ndarray) -> Tensor:
        out = model(*(_to_tensor(f[idx]).to(device) for f in frames))
        t = {k: v[idx].to(device) for k, v in targets.items()}
        return (F.cross_entropy(out["reward"], t["reward"])
                + F.binary_cross_entropy_with_logits(out["life_lost"], t["life_lost"])
                + F.binary_cross_entropy_with_logits(out["game_over"], t["game_over"]))

    batches = (np.sort(rng.choice(len(q), cfg.batch_size, p=q)) for _ in range(cfg.steps))
    losses = fit(model, batches, batch_loss, cfg.lr, cfg.weight_decay)
    return model.cpu().eval(), losses


def max_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold t of maximum F1 for the rule `score >= t` (halfway between the lowest score taken
    and the next lower one; of equal F1 the higher threshold). Needs at least one positive."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if not positive.any():
        raise ValueError("max_f1_threshold needs at least one positive")
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(positive[order])
    cut = np.flatnonzero(np.append(s[1:] < s[:-1], True))  # last index of each run of equal scores
    f1 = 2 * tp[cut] / (positive.sum() + cut + 1)
    k = cut[int(np.argmax(f1))]  # first maximum: the highest threshold
    return float(s[k] if k + 1 == len(s) else (s[k] + s[k + 1]) / 2)


# ---------------------------------------------------------------- scores

def _iter_pair_frames(r: dict[str, np.ndarray], prev: np.ndarray, nxt: np.ndarray, batch_size: int):
    """Yield (positions into prev/nxt, prev frames, nxt frames) over all pairs in batches, reading each
    file's frames about once: pairs go grouped by their files, the two files read last stay decoded."""
    fp, fn = r["file"][prev], r["file"][nxt]
    order = np.lexsort((fn, fp))
    decoded: OrderedDict[int, np.ndarray] = OrderedDict()

    def frames_of(fi: int) -> np.ndarray:
        if fi not in decoded:
            path = str(r["files"][fi])
            decoded[fi] = S.frames_from_arrow(pq.read_table(path, columns=[S.FRAME])[S.FRAME], path)
            if len(decoded) > 2:
                decoded.popitem(last=False)
        decoded.move_to_end(fi)
        return decoded[fi]

    starts = np.flatnonzero(np.append(True, (fp[order][1:] != fp[order][:-1]) | (fn[order][1:] != fn[order][:-1])))
    for a, b in zip(starts, np.append(starts[1:], len(order)), strict=True):
        group = order[a:b]
        for i in range(0, len(group), batch_size):
            pos = group[i:i + batch_size]
            fa, fb = frames_of(int(fp[pos[0]])), frames_of(int(fn[pos[0]]))
            yield pos, fa[r["row"][prev[pos]]], fb[r["row"][nxt[pos]]]


def _split_probabilities(heads: RewardHeads, data_root: str, game: str, split: str):
    """(labels, probabilities, pairs in the split) of a split's pairs (a seeded uniform subset of
    `eval_pairs` of them when set), in (episode, step) order."""
    r, prev, nxt, labels = _labelled_pairs(data_root, game, split)
    n_split = len(prev)
    if heads.cfg.eval_pairs and n_split > heads.cfg.eval_pairs:
        keep = np.sort(np.random.default_rng(heads.cfg.seed).choice(n_split, heads.cfg.eval_pairs, replace=False))
        prev, nxt, labels = prev[keep], nxt[keep], {k: v[keep] for k, v in labels.items()}
    probs = dict(reward=np.zeros((len(prev), len(REWARD_SIGNS)), np.float32),
                 life_lost=np.zeros(len(prev), np.float32), game_over=np.zeros(len(prev), np.float32))
    for pos, a, b in _iter_pair_frames(r, prev, nxt, _EVAL_BATCH):
        p = heads.probabilities(a, b)
        for k, v in probs.items():
            v[pos] = p[k]
    return labels, probs, n_split


def event_scores(predicted: np.ndarray, positive: np.ndarray) -> dict:
    """positives, predicted, tp, precision, recall, f1 of a binary decision (nan where undefined:
    precision without predictions, recall without positives, F1 without either)."""
    predicted, positive = np.asarray(predicted, bool), np.asarray(positive, bool)
    tp, n_pos, n_pred = int((predicted & positive).sum()), int(positive.sum()), int(predicted.sum())
    return dict(positives=n_pos, predicted=n_pred, tp=tp,
                precision=tp / n_pred if n_pred else math.nan, recall=tp / n_pos if n_pos else math.nan,
                f1=2 * tp / (n_pos + n_pred) if n_pos + n_pred else math.nan)


def _scores(heads: RewardHeads, labels: dict[str, np.ndarray], probs: dict[str, np.ndarray], split: str,
            n_split: int) -> dict:
    reward, life, over = heads.decide(probs)
    truth = _events(labels)
    out = dict(split=split, n=len(reward), pairs_in_split=int(n_split),
               reward=event_scores(reward != 0, truth["reward"]), life_lost=event_scores(life, truth["life_lost"]),
               game_over=event_scores(over, truth["game_over"]))
    nz = truth["reward"]
    sign = heads.sign(probs["reward"][nz])  # the sign `predict` gives a reward it flags
    out["reward_sign_n"] = int(nz.sum())
    out["reward_sign_accuracy"] = float(np.mean(sign == np.sign(labels["reward"][nz]))) if nz.any() else math.nan
    return out


def heads_scores(heads: RewardHeads, data_root: str, game: str, split: str = "test") -> dict:
    """The heads on a split's real pairs (at most `eval_pairs`, a seeded uniform subset): for each event
    of EVENTS ("reward" = non-zero reward) a dict of positives, predicted, tp, precision, recall and F1
    (`event_scores`); reward_sign_accuracy: on the pairs whose true reward is non-zero, the share whose
    likelier non-zero sign is the true one (nan without any), over reward_sign_n pairs; n pairs scored
    of pairs_in_split."""
    labels, probs, n_split = _split_probabilities(heads, data_root, game, split)
    return _scores(heads, labels, probs, split, n_split)


# ---------------------------------------------------------------- persistence

def save_heads(world_model_dir, heads: RewardHeads, meta: dict | None = None) -> Path:
    """Write the heads into `<world_model_dir>/heads/` (weights `heads.pt`, then `heads.json` with the
    config, thresholds, reward values, logit shifts, game, label counts, data used and `meta`).
    Returns that folder."""
    out = Path(world_model_dir) / HEADS_DIR
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in heads.model.state_dict().items()}, out / f".{_WEIGHTS}.tmp")
    os.replace(out / f".{_WEIGHTS}.tmp", out / _WEIGHTS)
    doc = dict(version=HEADS_VERSION, game=heads.game, config=asdict(heads.cfg), thresholds=heads.thresholds,
               threshold_source=heads.threshold_source, reward_values=list(heads.reward_values),
               shift=heads.shift, train_counts=heads.train_counts, data=heads.data,
               meta={**heads.meta, **(meta or {})})
    (out / f".{_META}.tmp").write_text(json.dumps(doc, indent=1, default=_json_default))
    os.replace(out / f".{_META}.tmp", out / _META)  # last: a folder with heads.json is complete
    return out


def load_heads(world_model_dir, device="cpu") -> RewardHeads:
    """The heads `save_heads` wrote into `<world_model_dir>/heads/`, on `device`. A world-model folder
    without them raises FileNotFoundError naming the command that trains them."""
    path = Path(world_model_dir) / HEADS_DIR
    if not (path / _META).is_file() or not (path / _WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{Path(world_model_dir)} has no reward/termination heads ({path / _META} and {_WEIGHTS} are "
            f"missing): the imagine stage of pipeline/run_all.py trains them: `{TRAIN_COMMAND}`")
    doc = json.loads((path / _META).read_text())
    if doc.get("version") != HEADS_VERSION:
        raise ValueError(f"{path / _META}: heads version {doc.get('version')}, this code reads version "
                         f"{HEADS_VERSION}; retrain them: `{TRAIN_COMMAND}`")
    model = RewardTerminationModel(RewardModelConfig(**doc["config"]))
    model.load_state_dict(torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True))
    heads = RewardHeads(model, thresholds=doc["thresholds"], reward_values=tuple(doc["reward_values"]),
                        shift=doc["shift"], game=doc["game"], threshold_source=doc["threshold_source"],
                        train_counts=doc["train_counts"], data=doc["data"], meta=doc["meta"])
    return heads.to(device)


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in {_META}")
