"""Inverse dynamics (workers/inverse_dynamics.py) on real Breakout frames, without Ray.

The data is random play of Breakout recorded here with the raw emulator (as `tests/ale_windows.py`
does, but kept per episode so no pair crosses a reset) and written as Parquet in the schema of
workers/schema.py: ~3,000 steps, a few seconds of emulation. Breakout is the game whose action
effects a pair shows: RIGHT/LEFT move the paddle (which keeps some momentum under NOOP), FIRE
launches the ball. The IDM is trained once per module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workers import inverse_dynamics as idm
from workers import schema as S
from workers.inverse_dynamics import (IDMConfig, InverseDynamics, cached_idm, generated_pairs, idm_scores,
                                      load_idm, pairs_from_dataset, save_idm, scores_by_frame,
                                      scores_from_predictions, train_idm)

GAME, ENV_ID = "Breakout", "ALE/Breakout-v5"
ENV_CONFIG = json.dumps(dict(frameskip=4, full_action_space=False, repeat_action_probability=0.0), sort_keys=True)
NUM_ACTIONS = 4
# small and short: ~10-15 s of training on one CPU core. Measured on this data over seeds 0-3 (100-150
# steps): held-out accuracy 0.62-0.67 against a majority share of 0.27; copy-last macro-F1 0.22-0.28.
FAST = IDMConfig(channels=(16, 32, 32), hidden=128, steps=150, batch_size=32, lr=2e-3, max_pairs=4000)
TINY = IDMConfig(channels=(4,), hidden=8, steps=2, batch_size=4, max_pairs=16)  # plumbing only
N_COND, HORIZON = 1, 4  # copy-last rollouts: 1 condition frame, 4 generated


def record_episodes(steps: int, seed: int) -> list[dict]:
    """Whole games of Breakout under uniformly random actions: per episode frames uint8 (N, 210, 160, 3)
    and actions int64 (N,), the last one NO_ACTION, as the recorder stores them."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(ENV_ID, **json.loads(ENV_CONFIG))
    rng = np.random.default_rng(seed)
    episodes, total = [], 0
    obs, _ = env.reset(seed=seed)
    frames, actions = [obs], []
    while total < steps:
        a = int(rng.integers(NUM_ACTIONS))
        obs, _, term, trunc, _ = env.step(a)
        actions.append(a)
        frames.append(obs)
        total += 1
        if term or trunc or total == steps:
            episodes.append(dict(frames=np.stack(frames), actions=np.asarray(actions + [S.NO_ACTION], np.int64)))
            obs, _ = env.reset()
            frames, actions = [obs], []
    env.close()
    return episodes


def episode_table(ep: dict, eid: str, split: str) -> pa.Table:
    n = len(ep["actions"])
    cols = {S.GAME: [GAME] * n, S.EPISODE_ID: [eid] * n, S.STEP: np.arange(n), S.ACTION: ep["actions"],
            S.REWARD: np.zeros(n), S.TERMINATED: np.arange(n) == n - 1, S.TRUNCATED: np.zeros(n, bool),
            S.LIVES: np.zeros(n), S.ENV_ID: [ENV_ID] * n, S.ENV_CONFIG: [ENV_CONFIG] * n,
            S.RESET_SEED: np.zeros(n), S.SPLIT: [split] * n}
    arrays = {k: pa.array(v, type=S.SCALAR_TYPES[k]) for k, v in cols.items()}
    arrays[S.FRAME] = S.frames_to_arrow(ep["frames"])
    return pa.table({c: arrays[c] for c in S.COLUMNS})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's 2 cores are shared: two intra-op threads contending with other work ran a step 10x
    slower than one thread did."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict]:
    """A Parquet collection of Breakout: every 4th episode in `test`, each episode cut over two files
    (pairs must be made across files). Returns (data root, {episode id: (split, episode)})."""
    root = tmp_path_factory.mktemp("idm_data")
    out = root / "episodes" / f"game={GAME}" / "run=t"
    out.mkdir(parents=True)
    episodes = {}
    for i, ep in enumerate(record_episodes(3000, seed=0)):
        eid, split = f"t.{GAME}.e{i}", "test" if i % 4 == 3 else "train"
        t = episode_table(ep, eid, split)
        half = t.num_rows // 2
        pq.write_table(t.slice(0, half), out / f"e{i}a.parquet", compression=S.COMPRESSION)
        pq.write_table(t.slice(half), out / f"e{i}b.parquet", compression=S.COMPRESSION)
        episodes[eid] = (split, ep)
    return str(root), episodes


@pytest.fixture(scope="module")
def trained(dataset):
    prev, nxt, actions = pairs_from_dataset(dataset[0], GAME, "train", FAST.max_pairs, FAST.seed)
    return train_idm(FAST, prev, nxt, actions, NUM_ACTIONS)


def test_resolution_keeps_ball_and_paddle(dataset):
    """2x2 pooling (105x80) keeps Breakout's 2x4-px ball and 16x4-px paddle (red (200, 72, 72) on black):
    each still covers a pooled cell at least half, the paddle whole cells."""
    frames = np.concatenate([ep["frames"] for _, ep in dataset[1].values()])  # (N, 210, 160, 3)
    model = InverseDynamics(IDMConfig(), NUM_ACTIONS)
    ball_in = (frames[:, 104:180, 10:150, 0] == 200).any((1, 2))  # the 2x4 ball lies within rows 100-183
    ball_any = (frames[:, 100:184, 8:152, 0] == 200).any((1, 2))  # cols 8-151, between bricks and paddle
    assert 100 < ball_in.sum() < len(frames)
    red = model.preprocess(torch.from_numpy(frames))[:, 0].numpy()  # (N, 105, 80) red channel in [0, 1]
    ball_pooled = red[:, 50:92, 4:76].max((1, 2))  # raw rows 100-183, cols 8-151
    # a 2-px ball that straddles two pooled cells still gives half its intensity to each
    assert (ball_pooled[ball_in] >= 0.5 * 200 / 255 - 1e-6).all()
    assert (ball_pooled[~ball_any] == 0).all()
    # paddle: raw rows 189-192, 16 px wide (8 at times: Breakout shrinks it, a wall hides part of it)
    width = (frames[:, 189:193, 8:152, 0] == 200).any(1).sum(1)  # (N,) raw columns
    full = (red[:, 95, 4:76] >= 200 / 255 - 1e-6).sum(1)  # (N,) pooled columns fully covered (raw 190-191)
    assert (width >= 8).mean() > 0.9
    assert (full[width >= 8] >= 3).all()  # 8 px give 4 whole cells, 3 when not aligned
    assert (full[width >= 16] >= 7).mean() > 0.9


def test_pairs_from_dataset(dataset):
    root, episodes = dataset
    prev, nxt, actions = pairs_from_dataset(root, GAME, "train")
    train = {e: ep for e, (split, ep) in episodes.items() if split == "train"}
    assert prev.shape == nxt.shape == (len(actions), *S.FRAME_SHAPE) and prev.dtype == np.uint8
    # (episode, step) order; every episode's last row (NO_ACTION) starts no pair
    expected = np.concatenate([train[e]["actions"][:-1] for e in sorted(train)])
    np.testing.assert_array_equal(actions, expected)
    # the pair across each episode's file boundary, and each episode's last pair
    pos = 0
    for e in sorted(train):
        fr = train[e]["frames"]
        for k in ((len(fr) // 2) - 1, len(fr) - 2):
            np.testing.assert_array_equal(prev[pos + k], fr[k])
            np.testing.assert_array_equal(nxt[pos + k], fr[k + 1])
        pos += len(fr) - 1
    # max_pairs: a seeded subset, in order
    p1, _, a1 = pairs_from_dataset(root, GAME, "train", max_pairs=50, seed=3)
    p2, _, a2 = pairs_from_dataset(root, GAME, "train", max_pairs=50, seed=3)
    assert len(a1) == 50 and np.array_equal(a1, a2) and np.array_equal(p1, p2)
    with pytest.raises(ValueError, match=rf"(?s)'{GAME}'.*'val'.*{root}|'{GAME}'.*'val'"):
        pairs_from_dataset(root, GAME, "val")
    with pytest.raises(ValueError) as e:
        pairs_from_dataset(root, GAME, "val")
    assert root in str(e.value) and GAME in str(e.value) and "'val'" in str(e.value)


def test_idm_beats_constant_guess_on_held_out_real_pairs(dataset, trained):
    model, info = trained
    prev, nxt, actions = pairs_from_dataset(dataset[0], GAME, "test")
    s = idm_scores(model, prev, nxt, actions, NUM_ACTIONS)
    print(f"IDM real test pairs: accuracy {s['accuracy']:.3f} macro-F1 {s['macro_f1']:.3f} "
          f"majority share {s['majority_share']:.3f} (n={s['n']}, trained {info['seconds']:.1f} s)\n"
          f"{s['confusion']}")
    assert s["confusion"].shape == (NUM_ACTIONS, NUM_ACTIONS) and s["confusion"].sum() == len(actions)
    np.testing.assert_array_equal(s["confusion"].sum(1), np.bincount(actions, minlength=NUM_ACTIONS))
    assert s["accuracy"] > s["majority_share"] + 0.2
    assert s["macro_f1"] > 0.45
    # RIGHT (2) and LEFT (3) move the paddle: mostly read right
    assert s["f1"][2] > 0.6 and s["f1"][3] > 0.6


def test_copy_last_scores_at_chance_true_future_well_above(dataset, trained):
    """Rollouts of 1 condition frame + 4 frames from held-out windows: a model that ignores its actions
    (every generated frame = the last condition frame) against the true future frames."""
    model, _ = trained
    cond, future, acts = [], [], []
    for split, ep in dataset[1].values():
        if split != "test":
            continue
        L = N_COND + HORIZON
        for s in range(0, len(ep["frames"]) - L + 1, HORIZON):  # windows overlap by the condition frame
            w = ep["frames"][s:s + L]
            cond.append(w[N_COND - 1])
            future.append(w[N_COND:])
            acts.append(ep["actions"][s + N_COND - 1:s + N_COND - 1 + HORIZON])  # a_t..a_{t+T-1}
    cond, future, acts = np.stack(cond), np.stack(future), np.stack(acts)  # (B, ...), (B, T, ...), (B, T)
    copy_last = np.repeat(cond[:, None], HORIZON, axis=1)  # (B, T, 210, 160, 3)
    fake = scores_by_frame(model, cond, copy_last, acts, NUM_ACTIONS)
    real = scores_by_frame(model, cond, future, acts, NUM_ACTIONS)
    per = [f"{f['macro_f1']:.2f}/{r['macro_f1']:.2f}" for f, r in zip(fake["per_frame"], real["per_frame"])]
    print(f"copy-last macro-F1 {fake['all']['macro_f1']:.3f} (accuracy {fake['all']['accuracy']:.3f}), true "
          f"future macro-F1 {real['all']['macro_f1']:.3f} (accuracy {real['all']['accuracy']:.3f}), "
          f"n={real['all']['n']}; per frame copy/true {per}")
    assert len(fake["per_frame"]) == HORIZON and sum(p["n"] for p in fake["per_frame"]) == acts.size
    assert fake["all"]["macro_f1"] <= 1 / NUM_ACTIONS + 0.06
    assert real["all"]["macro_f1"] > 0.45
    assert real["all"]["macro_f1"] > fake["all"]["macro_f1"] + 0.2


def test_generated_pairs_shapes_and_order():
    B, T = 2, 3
    cond = np.stack([np.full(S.FRAME_SHAPE, 100 + b, np.uint8) for b in range(B)])  # (B, H, W, 3)
    gen = np.stack([np.stack([np.full(S.FRAME_SHAPE, 10 * b + k, np.uint8) for k in range(T)])
                    for b in range(B)])  # (B, T, H, W, 3)
    for c, g in ((cond, gen), (torch.from_numpy(cond), torch.from_numpy(gen))):
        prev, nxt, index = generated_pairs(c, g)
        assert tuple(prev.shape) == tuple(nxt.shape) == (B * T, *S.FRAME_SHAPE) and tuple(index.shape) == (B * T,)
        assert type(prev) is type(g) and type(index) is type(g)
        first = [int(x[0, 0, 0]) for x in prev], [int(x[0, 0, 0]) for x in nxt], [int(k) for k in index]
        assert first == ([100, 0, 1, 101, 10, 11], [0, 1, 2, 10, 11, 12], [0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="must agree"):
        generated_pairs(cond[:1], gen)


def test_training_is_deterministic_and_save_load_roundtrip(dataset, tmp_path):
    prev, nxt, actions = pairs_from_dataset(dataset[0], GAME, "train", max_pairs=16, seed=0)
    m1, _ = train_idm(TINY, prev, nxt, actions, NUM_ACTIONS)
    m2, _ = train_idm(TINY, prev, nxt, actions, NUM_ACTIONS)
    m3, _ = train_idm(IDMConfig(**{**TINY.__dict__, "seed": 1}), prev, nxt, actions, NUM_ACTIONS)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(m1.head[-1].weight, m3.head[-1].weight)
    save_idm(str(tmp_path / "idm"), m1, TINY, dict(note="x", counts=np.arange(3)))
    m4, cfg, meta = load_idm(str(tmp_path / "idm"))
    assert cfg == TINY and meta == dict(note="x", counts=[0, 1, 2])
    with torch.no_grad():
        assert torch.equal(m1(torch.from_numpy(prev), torch.from_numpy(nxt)),
                           m4(torch.from_numpy(prev), torch.from_numpy(nxt)))


def test_cached_idm_trains_once(dataset, tmp_path, monkeypatch):
    calls = []
    real_train = idm.train_idm

    def counting(*a, **k):
        calls.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(idm, "train_idm", counting)
    cache = str(tmp_path / "cache")
    m1, meta1 = cached_idm(dataset[0], GAME, TINY, cache, eval_split="test")
    m2, meta2 = cached_idm(dataset[0], GAME, TINY, cache, eval_split="test")
    assert len(calls) == 1 and meta1["trained"] and not meta2["trained"]
    assert meta2["eval"]["split"] == "test" and meta2["eval"]["n"] == TINY.max_pairs
    assert m2.num_actions == NUM_ACTIONS
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert len(os.listdir(cache)) == 1  # no temporary left behind
    cached_idm(dataset[0], "ALE/Breakout-v5", IDMConfig(**{**TINY.__dict__, "seed": 1}), cache)
    assert len(calls) == 2 and len(os.listdir(cache)) == 2  # another config: another IDM


def test_cache_key_follows_the_files(tmp_path):
    files = tmp_path / "episodes"
    files.mkdir()
    (files / "a.parquet").write_bytes(b"x" * 10)
    k1 = idm.cache_key(str(tmp_path), GAME, TINY)
    assert idm.cache_key(str(tmp_path), GAME, TINY) == k1
    assert idm.cache_key(str(tmp_path), "Pong", TINY) != k1
    assert idm.cache_key(str(tmp_path), GAME, IDMConfig(**{**TINY.__dict__, "lr": 0.1})) != k1
    (files / "b.parquet").write_bytes(b"y")
    k2 = idm.cache_key(str(tmp_path), GAME, TINY)
    (files / "b.parquet").write_bytes(b"yy")  # re-collected: same name, other size
    assert len({k1, k2, idm.cache_key(str(tmp_path), GAME, TINY)}) == 3


def test_out_of_range_actions_refused(tmp_path):
    frames = np.zeros((3, *S.FRAME_SHAPE), np.uint8)
    with pytest.raises(ValueError, match=r"action 4 .*0\.\.3"):
        train_idm(TINY, frames, frames, np.array([0, 4, 1]), NUM_ACTIONS)
    with pytest.raises(ValueError, match=r"action -1 .*0\.\.3"):
        scores_from_predictions(np.array([0, 1, 2]), np.array([0, -1, 2]), NUM_ACTIONS)
    with pytest.raises(ValueError, match=r"predictions.*action 5 .*0\.\.3"):
        scores_from_predictions(np.array([0, 5, 2]), np.array([0, 1, 2]), NUM_ACTIONS)
    # in the data: an action the game's action space does not have (Breakout has 4)
    ep = dict(frames=np.zeros((3, *S.FRAME_SHAPE), np.uint8), actions=np.array([1, 7, S.NO_ACTION]))
    pq.write_table(episode_table(ep, "bad", "train"), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"action 7 .*0\.\.3"):
        pairs_from_dataset(str(tmp_path), GAME, "train")


def test_scores_from_predictions_macro_f1_over_present_actions():
    # labels use actions 0 and 1 of 4; a prediction of 3 is a miss of the true action
    s = scores_from_predictions(np.array([0, 0, 1, 3]), np.array([0, 0, 1, 1]), NUM_ACTIONS)
    assert s["accuracy"] == 0.75 and s["majority_share"] == 0.5
    assert np.isnan(s["f1"][2]) and np.isnan(s["f1"][3])
    assert s["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # F1(0) = 1, F1(1) = 2*1/(2+1)
    assert s["confusion"][1, 3] == 1 and s["confusion"].sum() == 4
