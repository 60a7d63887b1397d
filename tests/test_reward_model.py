"""Reward and termination heads (workers/reward_model.py) on real frames, without Ray.

Two datasets. `tiny_split_root` (conftest) is a real random-policy collection of Breakout and Pong with
train, val and test episodes, but its episodes are short and cut by the collection budget: it holds no
reward, no life loss and no game over. The heads must still train on it (and predict none of them).
The events come from `breakout`: whole games of random Breakout recorded here with the raw emulator
(~3,000 steps, a few seconds: ~15 games; the train split holds ~15 rewards, ~50 life losses and ~9
game overs), written in the schema of workers/schema.py with every episode cut over two files. The
heads are trained on it once per module (~5 s on one core).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from workers import schema as S
from workers.inverse_dynamics import pairs_from_dataset, read_frames
from workers.reward_model import (
    EVENTS,
    RewardHeads,
    RewardModelConfig,
    RewardTerminationModel,
    _labelled_pairs,
    _reward_values,
    heads_scores,
    load_heads,
    max_f1_threshold,
    pair_labels,
    save_heads,
    train_heads,
    training_subset,
)

GAME, ENV_ID = "Breakout", "ALE/Breakout-v5"
ENV_CONFIG = json.dumps(dict(frameskip=4, full_action_space=False, repeat_action_probability=0.0), sort_keys=True)
# Measured on this data, seeds 0-4: 4.5-8 s of training; on the training pairs AUC 1.00 (reward) and
# 0.98-0.99 (life loss); on the test split reward F1 0.55-1.0 (4 positives), life-loss F1 0.71-0.79 (15).
FAST = RewardModelConfig(channels=(8, 16, 16), hidden=64, steps=80, batch_size=32, lr=2e-3, max_pairs=400)
TINY = RewardModelConfig(channels=(4,), hidden=8, steps=2, batch_size=4, max_pairs=16)  # plumbing only


def record_episodes(steps: int, seed: int) -> list[dict]:
    """Whole games of Breakout under uniformly random actions, as the recorder stores them: per episode
    frames uint8 (N, 210, 160, 3), actions (N,) ending in NO_ACTION, rewards (N,) (reward of the action
    at that row, 0 on the last), lives (N,) (lives at that frame) and whether the game ended (terminated)
    rather than the recording."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(ENV_ID, **json.loads(ENV_CONFIG))
    rng = np.random.default_rng(seed)
    episodes, total = [], 0
    obs, info = env.reset(seed=seed)
    ep = dict(frames=[obs], actions=[], rewards=[], lives=[info["lives"]])
    while total < steps:
        a = int(rng.integers(env.action_space.n))
        obs, r, term, trunc, info = env.step(a)
        total += 1
        for k, v in (("frames", obs), ("actions", a), ("rewards", r), ("lives", info["lives"])):
            ep[k].append(v)
        if term or trunc or total == steps:
            episodes.append(dict(frames=np.stack(ep["frames"]), actions=np.array(ep["actions"] + [S.NO_ACTION]),
                                 rewards=np.array(ep["rewards"] + [0.0], np.float32), lives=np.array(ep["lives"]),
                                 terminated=bool(term)))
            obs, info = env.reset()
            ep = dict(frames=[obs], actions=[], rewards=[], lives=[info["lives"]])
    env.close()
    return episodes


def episode_table(ep: dict, eid: str, split: str) -> pa.Table:
    n = len(ep["actions"])
    last = np.arange(n) == n - 1
    cols = {S.GAME: [GAME] * n, S.EPISODE_ID: [eid] * n, S.STEP: np.arange(n), S.ACTION: ep["actions"],
            S.REWARD: ep["rewards"], S.TERMINATED: last & ep["terminated"], S.TRUNCATED: last & (not ep["terminated"]),
            S.LIVES: ep["lives"], S.ENV_ID: [ENV_ID] * n, S.ENV_CONFIG: [ENV_CONFIG] * n,
            S.RESET_SEED: np.zeros(n), S.SPLIT: [split] * n}
    arrays = {k: pa.array(v, type=S.SCALAR_TYPES[k]) for k, v in cols.items()}
    arrays[S.FRAME] = S.frames_to_arrow(ep["frames"])
    return pa.table({c: arrays[c] for c in S.COLUMNS})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's 2 cores are shared (as in test_inverse_dynamics.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def breakout(tmp_path_factory) -> tuple[str, dict]:
    """Episodes 3, 8, 13, ... in val, 4, 9, 14, ... in test, the rest in train; each episode cut over
    two files. Returns (data root, {episode id: (split, episode)})."""
    root = tmp_path_factory.mktemp("reward_data")
    out = root / "episodes" / f"game={GAME}" / "run=t"
    out.mkdir(parents=True)
    episodes = {}
    for i, ep in enumerate(record_episodes(3000, seed=0)):
        eid, split = f"t.{GAME}.e{i:02d}", {3: "val", 4: "test"}.get(i % 5, "train")
        t = episode_table(ep, eid, split)
        half = t.num_rows // 2
        pq.write_table(t.slice(0, half), out / f"e{i}a.{split}.parquet", compression=S.COMPRESSION)
        pq.write_table(t.slice(half), out / f"e{i}b.{split}.parquet", compression=S.COMPRESSION)
        episodes[eid] = (split, ep)
    return str(root), episodes


@pytest.fixture(scope="module")
def trained(breakout):
    logs: list[str] = []
    heads, report = train_heads(FAST, breakout[0], GAME, log=logs.append)
    return heads, report, logs


def expected_labels(root: str, game: str, split: str) -> dict[str, np.ndarray]:
    """The pair labels computed from the Parquet rows with pyarrow and pandas (no repo code)."""
    files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
    cols = [S.GAME, S.SPLIT, S.EPISODE_ID, S.STEP, S.ACTION, S.REWARD, S.LIVES, S.TERMINATED]
    t = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    t = t.filter(pc.and_(pc.equal(t[S.GAME], game), pc.equal(t[S.SPLIT], split)))
    df = t.to_pandas().sort_values([S.EPISODE_ID, S.STEP]).reset_index(drop=True)
    nxt = df.shift(-1)
    is_pair = ((nxt[S.EPISODE_ID] == df[S.EPISODE_ID]) & (nxt[S.STEP] == df[S.STEP] + 1)
               & (df[S.ACTION] != S.NO_ACTION)).to_numpy()
    next_is_last = (nxt[S.STEP] == nxt[S.EPISODE_ID].map(df.groupby(S.EPISODE_ID)[S.STEP].max())).to_numpy()
    next_terminated = nxt[S.TERMINATED].fillna(False).astype(bool).to_numpy()
    return dict(episode_id=df[S.EPISODE_ID].to_numpy()[is_pair], step=df[S.STEP].to_numpy()[is_pair],
                reward=df[S.REWARD].to_numpy()[is_pair],
                life_lost=(nxt[S.LIVES] < df[S.LIVES]).to_numpy()[is_pair],
                game_over=(next_is_last & next_terminated)[is_pair])


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


# ---------------------------------------------------------------- labels

def test_pair_labels_match_the_rows_and_the_emulator(breakout, tiny_split_root):
    root, episodes = breakout
    for split in S.SPLITS:
        got, want = pair_labels(root, GAME, split), expected_labels(root, GAME, split)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split} {k}")
        # and straight from the recording: r_t, the lives drop, the game's end on its last pair
        eps = [ep for e, (s, ep) in sorted(episodes.items()) if s == split]
        np.testing.assert_array_equal(got["reward"], np.concatenate([ep["rewards"][:-1] for ep in eps]))
        np.testing.assert_array_equal(got["life_lost"], np.concatenate([np.diff(ep["lives"]) < 0 for ep in eps]))
        np.testing.assert_array_equal(got["game_over"], np.concatenate(
            [(np.arange(len(ep["lives"]) - 1) == len(ep["lives"]) - 2) & ep["terminated"] for ep in eps]))
    train = pair_labels(root, GAME, "train")
    assert (train["reward"] != 0).sum() >= 10 and train["life_lost"].sum() >= 30 and train["game_over"].sum() >= 5
    assert not (train["game_over"] & ~train["life_lost"]).any()  # Breakout ends on its last life lost
    # the collected data: no event in it, but the same labels either way
    for game in ("Breakout", "Pong"):
        for split in S.SPLITS:
            got, want = pair_labels(tiny_split_root, game, split), expected_labels(tiny_split_root, game, split)
            assert len(want["step"]) > 10
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{game} {split} {k}")


def test_training_subset_keeps_every_event():
    rng = np.random.default_rng(0)
    n = 1000
    labels = dict(reward=np.zeros(n, np.float32), life_lost=np.zeros(n, bool), game_over=np.zeros(n, bool))
    labels["reward"][[3, 50, 700]] = [1, -1, 4]
    labels["life_lost"][[10, 700, 999]] = True
    keep = training_subset(labels, 20, rng)
    assert len(keep) == 20 and (np.diff(keep) > 0).all()
    assert {3, 10, 50, 700, 999} <= set(keep.tolist())
    assert len(training_subset(labels, 3, rng)) == 3 and len(training_subset(labels, 5000, rng)) == n


# ---------------------------------------------------------------- training and scores

def test_heads_separate_events_on_their_training_pairs(breakout, trained):
    heads, report, logs = trained
    r, prev, nxt, labels = _labelled_pairs(breakout[0], GAME, "train")
    keep = training_subset(labels, FAST.max_pairs, np.random.default_rng(FAST.seed))  # what train_heads used
    assert report["train"]["used"]["pairs"] == len(keep) == FAST.max_pairs
    fp, fn = read_frames(r, prev[keep], nxt[keep])
    p = heads.probabilities(fp, fn)
    y = {k: v[keep] for k, v in labels.items()}
    a_reward = auc(p["reward"][:, 0] + p["reward"][:, 2], y["reward"] != 0)
    a_life, a_over = auc(p["life_lost"], y["life_lost"]), auc(p["game_over"], y["game_over"])
    print(f"training pairs AUC: reward {a_reward:.3f} life lost {a_life:.3f} game over {a_over:.3f}; "
          f"{report['train']['seconds']:.1f} s, loss {report['train']['loss']:.3f}\n" + "\n".join(logs))
    assert a_reward > 0.9 and a_life > 0.9  # chance is 0.5
    # the probabilities are the raw logits shifted by one constant per head (the oversampling's prior)
    with torch.no_grad():
        raw = heads.model(torch.from_numpy(fp[:64]), torch.from_numpy(fn[:64]))
    assert set(raw) == set(EVENTS) and raw["reward"].shape == (64, 3) and raw["life_lost"].shape == (64,)
    assert heads.shift["life_lost"] < 0  # life losses are rarer in the data than in the batches
    np.testing.assert_allclose(p["life_lost"][:64], torch.sigmoid(raw["life_lost"] + heads.shift["life_lost"]),
                               rtol=1e-5, atol=1e-6)


def test_held_out_scores_and_predict(breakout, trained):
    heads, report, _ = trained
    root = breakout[0]
    val, test = pair_labels(root, GAME, "val"), pair_labels(root, GAME, "test")
    # thresholds of the val split, where every event has positives
    assert report["val"]["n"] == len(val["step"]) and not report["warnings"]
    for k in EVENTS:
        assert report["threshold_source"][k].startswith("val max-F1"), report["threshold_source"]
        assert 0 < report["thresholds"][k] < 1
    assert report["val"]["life_lost"]["positives"] == val["life_lost"].sum()
    s = heads_scores(heads, root, GAME, "test")
    print({k: {m: s[k][m] for m in ("positives", "predicted", "tp", "precision", "recall", "f1")} for k in EVENTS})
    assert s["n"] == s["pairs_in_split"] == len(test["step"])
    truth = dict(reward=test["reward"] != 0, life_lost=test["life_lost"], game_over=test["game_over"])
    for k in EVENTS:
        assert s[k]["positives"] == truth[k].sum() > 0
    assert s["reward"]["f1"] > 0.4 and s["life_lost"]["f1"] > 0.6  # chance: about the positive rate (< 0.03)
    assert s["reward_sign_n"] == truth["reward"].sum() and s["reward_sign_accuracy"] == 1.0  # Breakout: all +
    # predict on the same pairs, read in one piece, agrees with the file-by-file scoring
    prev, nxt, _ = pairs_from_dataset(root, GAME, "test")
    reward, life, over = heads.predict(prev, nxt)
    assert reward.dtype == np.float32 and life.dtype == bool and over.dtype == bool and reward.shape == (len(prev),)
    for k, pred in (("reward", reward != 0), ("life_lost", life), ("game_over", over)):
        assert (s[k]["predicted"], s[k]["tp"]) == (pred.sum(), (pred & truth[k]).sum()), k
        prec = s[k]["tp"] / s[k]["predicted"] if s[k]["predicted"] else np.nan
        np.testing.assert_equal(s[k]["precision"], prec)
    # a predicted reward is the train split's mean positive reward; Breakout gives no negative one
    train_reward = pair_labels(root, GAME, "train")["reward"]
    assert heads.reward_values == (None, 0.0, pytest.approx(float(train_reward[train_reward > 0].mean())))
    assert set(np.unique(reward)) <= {0.0, np.float32(heads.reward_values[2])}
    # a scored subset: eval_pairs of them
    sub = RewardHeads(heads.model, thresholds=heads.thresholds, reward_values=heads.reward_values, shift=heads.shift,
                      game=GAME)
    sub.cfg = dataclasses.replace(heads.cfg, eval_pairs=100)
    s100 = heads_scores(sub, root, GAME, "test")
    assert s100["n"] == 100 and s100["pairs_in_split"] == len(test["step"])


def test_reward_values_and_decisions():
    assert _reward_values(np.array([0, 1, 4, 7, -1, -3, 0], np.float32)) == (-2.0, 0.0, 4.0)
    assert _reward_values(np.zeros(5, np.float32)) == (None, 0.0, None)
    model = RewardTerminationModel(TINY)
    heads = RewardHeads(model, thresholds=dict(reward=0.5, life_lost=0.3, game_over=0.9),
                        reward_values=(-2.0, 0.0, 4.0), game="X",
                        shift=dict(reward=[0.0, 0.0, 0.0], life_lost=0.0, game_over=None))
    probs = dict(reward=np.array([[0.1, 0.8, 0.1], [0.5, 0.2, 0.3], [0.2, 0.1, 0.7], [0.0, 0.5, 0.5]], np.float32),
                 life_lost=np.array([0.1, 0.3, 0.9, 0.0], np.float32), game_over=np.ones(4, np.float32))
    reward, life, over = heads.decide(probs)
    np.testing.assert_array_equal(reward, [0.0, -2.0, 4.0, 4.0])
    np.testing.assert_array_equal(life, [False, True, True, False])
    assert not over.any()  # never seen in training: never predicted, whatever the network says


def test_max_f1_threshold():
    s, y = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0], bool)
    assert max_f1_threshold(s, y) == pytest.approx(0.55)
    # F1 1 at the top score alone vs 2/3 at all four: the higher threshold; ties at one score count together
    assert max_f1_threshold(np.array([0.7, 0.4, 0.4, 0.4]), np.array([1, 0, 0, 1], bool)) == pytest.approx(0.55)
    assert max_f1_threshold(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5
    with pytest.raises(ValueError, match="positive"):
        max_f1_threshold(s, np.zeros(4, bool))


# ---------------------------------------------------------------- data without events or val

def test_collected_data_without_events_and_without_val(tiny_split_root, tmp_path):
    logs: list[str] = []
    heads, report = train_heads(TINY, tiny_split_root, "Pong", log=logs.append)
    again, _ = train_heads(TINY, tiny_split_root, "ALE/Pong-v5", log=lambda m: None)
    for (k, a), b in zip(heads.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # seeded
    c = report["train"]["counts"]
    absent = [k for k, n in (("reward", c["reward_neg"] + c["reward_pos"]), ("life_lost", c["life_lost"]),
                             ("game_over", c["game_over"])) if n == 0]
    assert {"life_lost", "game_over"} <= set(absent)  # Pong has no lives; its 40-step games end no game
    assert len(report["warnings"]) == len(absent) and all("never predict one" in w for w in report["warnings"])
    prev, nxt, _ = pairs_from_dataset(tiny_split_root, "Pong", "test")
    predicted = dict(zip(EVENTS, heads.predict(prev, nxt), strict=True))
    s = heads_scores(heads, tiny_split_root, "Pong", "test")
    assert s["n"] == len(prev)
    for k in absent:
        assert not heads.enabled(k) and "never predicted" in report["threshold_source"][k]
        assert not predicted[k].any() and s[k]["predicted"] == 0 and np.isnan(s[k]["precision"])
    if "reward" in absent and s["reward"]["positives"] == 0:
        assert np.isnan(s["reward"]["f1"]) and np.isnan(s["reward_sign_accuracy"])
    # two-split data (collected before the val split existed): trains, says so, thresholds 0.5
    old = tmp_path / "old"
    for f in glob.glob(os.path.join(tiny_split_root, "**", "*.parquet"), recursive=True):
        if not f.endswith(".val.parquet"):
            dst = old / os.path.relpath(f, tiny_split_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    heads, report = train_heads(TINY, str(old), "Breakout", log=logs.append)
    assert report["val"] is None and heads.thresholds == {k: 0.5 for k in EVENTS}
    assert any("no val" in w for w in report["warnings"]) and any("no val" in m for m in logs)
    assert all(v == "default 0.5: no val split" for v in report["threshold_source"].values())
    assert heads_scores(heads, str(old), "Breakout", "test")["n"] > 0


def test_no_val_split_with_events(breakout, tmp_path):
    """Two-split data that has events: the heads predict them at the default thresholds."""
    root = tmp_path / "two_split"
    for f in glob.glob(os.path.join(breakout[0], "**", "*.parquet"), recursive=True):
        if not f.endswith(".val.parquet"):
            dst = root / os.path.relpath(f, breakout[0])
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f, dst)
    cfg = dataclasses.replace(TINY, max_pairs=120)  # room for every event pair
    heads, report = train_heads(cfg, str(root), GAME, log=lambda m: None)
    assert report["val"] is None and heads.thresholds == {k: 0.5 for k in EVENTS}
    assert all(heads.enabled(k) for k in EVENTS) and report["train"]["used"]["pairs"] == cfg.max_pairs
    assert report["train"]["used"]["life_lost"] == report["train"]["counts"]["life_lost"]
    assert heads_scores(heads, str(root), GAME, "test")["reward"]["positives"] > 0


# ---------------------------------------------------------------- persistence and errors

def test_save_load_roundtrip(breakout, trained, tmp_path):
    heads, report, _ = trained
    wm = tmp_path / "world_model"
    wm.mkdir()
    path = save_heads(wm, heads, dict(note="x", counts=np.arange(3), report=report))  # the report: nan, None
    assert path == wm / "heads" and {p.name for p in path.iterdir()} == {"heads.pt", "heads.json"}
    doc = json.loads((path / "heads.json").read_text())
    assert doc["game"] == GAME and doc["config"]["channels"] == list(FAST.channels)
    assert doc["thresholds"] == heads.thresholds and doc["reward_values"] == list(heads.reward_values)
    assert doc["data"]["data_root"] == os.path.abspath(breakout[0]) and doc["meta"]["counts"] == [0, 1, 2]
    assert doc["meta"]["report"]["thresholds"] == heads.thresholds
    loaded = load_heads(str(wm))
    assert loaded.cfg == heads.cfg and loaded.thresholds == heads.thresholds and loaded.game == GAME
    assert loaded.reward_values == heads.reward_values and loaded.shift == heads.shift
    prev, nxt, _ = pairs_from_dataset(breakout[0], GAME, "test", max_pairs=48, seed=1)
    from_torch = loaded.predict(torch.from_numpy(prev), torch.from_numpy(nxt))
    for a, b in zip(heads.predict(prev, nxt), from_torch, strict=True):
        np.testing.assert_array_equal(a, b)
    pa_, pb = heads.probabilities(prev, nxt), loaded.to("cpu").probabilities(prev, nxt)
    for k in EVENTS:
        np.testing.assert_array_equal(pa_[k], pb[k])


def test_load_heads_without_heads_names_the_command(tmp_path):
    (tmp_path / "vae.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        load_heads(tmp_path)
    msg = str(e.value)
    assert "python pipeline/run_all.py --preset <preset> --stages imagine" in msg
    assert "the imagine stage of pipeline/run_all.py trains them" in msg and str(tmp_path) in msg


def test_bad_frames_are_refused():
    heads = RewardHeads(RewardTerminationModel(TINY), thresholds={k: 0.5 for k in EVENTS},
                        reward_values=(None, 0.0, 1.0), game=GAME,
                        shift=dict(reward=[None, 0.0, 0.0], life_lost=0.0, game_over=0.0))
    ok = np.zeros((2, *S.FRAME_SHAPE), np.uint8)
    shape = r"\(N, 210, 160, 3\)"
    channels_first = torch.zeros(2, 3, 210, 160, dtype=torch.uint8)
    for bad in (ok.astype(np.float32), np.zeros((2, 84, 84, 3), np.uint8), ok[0], channels_first):
        with pytest.raises(ValueError, match=shape):
            heads.predict(bad, ok)
        with pytest.raises(ValueError, match=shape):
            heads.predict(ok, bad)
        with pytest.raises(ValueError, match=shape):
            heads.model(torch.as_tensor(bad), torch.from_numpy(ok))
    with pytest.raises(ValueError, match=shape):
        heads.predict(ok.tolist(), ok)
    with pytest.raises(ValueError, match="2 prev frames but 1 nxt"):
        heads.predict(ok, ok[:1])
    reward, life, over = heads.predict(ok, ok)
    assert reward.shape == life.shape == over.shape == (2,)
    assert heads.predict(ok[:0], ok[:0])[0].shape == (0,)


@pytest.mark.parametrize("field,value", [("pool", 3), ("channels", ()), ("hidden", 0), ("steps", 0),
                                         ("batch_size", 0), ("max_pairs", 0), ("lr", 0.0),
                                         ("positive_fraction", 1.0), ("eval_pairs", -1)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RewardModelConfig(**{field: value})


def test_config_from_json():
    cfg = RewardModelConfig(**json.loads(json.dumps(dataclasses.asdict(TINY))))
    assert cfg == TINY and cfg.channels == (4,)
