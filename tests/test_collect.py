"""Collection on real ALE games, a real local Ray cluster and real Parquet (tiny budgets)."""

from __future__ import annotations

import dataclasses

import json
import os
import shutil

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers import schema as S
from workers.atari import resolve_env_id
from workers.clips import parquet_files, validate_dataset


def _replay(ep, actions) -> np.ndarray:
    """An episode's frames re-played from its recorded env id, settings, reset seed and actions."""
    env = gym.make(ep[S.ENV_ID][0].as_py(), obs_type="rgb", **json.loads(ep[S.ENV_CONFIG][0].as_py()))
    obs, _ = env.reset(seed=int(ep[S.RESET_SEED][0].as_py()))
    replay = [obs]
    for a in actions[:-1]:  # the last row's action is NO_ACTION
        obs, *_ = env.step(int(a))
        replay.append(obs)
    env.close()
    return np.stack(replay)

def _scalars(root: str) -> pa.Table:
    cols = [c for c in S.COLUMNS if c != S.FRAME]
    return pa.concat_tables([pq.ParquetFile(f).read(columns=cols) for f in parquet_files(root)])


def test_unknown_game_fails_listing_valid_ones():
    from pipeline.collect import CollectConfig, main

    with pytest.raises(ValueError, match="Breakout.*Pong|Pong.*Breakout"):
        resolve_env_id("Pongg")
    with pytest.raises(ValueError, match="unknown Atari game 'NoSuchGame'"):
        main(CollectConfig(games=("Pong", "NoSuchGame")))
    assert resolve_env_id("DemonAttack") == "ALE/DemonAttack-v5"
    with pytest.raises(ValueError, match="gpus_per_env_runner must be >= 0, got -1"):
        CollectConfig(gpus_per_env_runner=-1)


def test_dataset_schema_shapes_ranges(tiny_dataset):
    root = tiny_dataset.root
    assert sorted(os.listdir(os.path.join(root, "episodes"))) == ["game=Breakout", "game=Pong"]
    info = validate_dataset(root)
    t = _scalars(root)
    assert info["rows"] == t.num_rows
    for game, env_id, n_act in (("Pong", "ALE/Pong-v5", 6), ("Breakout", "ALE/Breakout-v5", 4)):
        g = t.filter(pa.compute.equal(t[S.GAME], game))
        assert g.num_rows >= 300  # the budget, plus the closing frame of each env's game
        assert set(g[S.ENV_ID].to_pylist()) == {env_id}
        cfg = json.loads(g[S.ENV_CONFIG][0].as_py())
        assert cfg["repeat_action_probability"] == 0.0 and cfg["frameskip"] == 4
        a = g[S.ACTION].to_numpy()
        assert a.min() >= -1 and a.max() < n_act and (a >= 0).sum() > 0.9 * len(a)
        assert tiny_dataset.manifest["games"][game]["rows"] == g.num_rows
    eids = t[S.EPISODE_ID].to_numpy(zero_copy_only=False)
    steps, games = t[S.STEP].to_numpy(), t[S.GAME].to_numpy(zero_copy_only=False)
    splits = t[S.SPLIT].to_numpy(zero_copy_only=False)
    for e in np.unique(eids):
        m = eids == e
        assert len(set(games[m])) == 1  # an id never spans two games
        assert len(set(splits[m])) == 1, (e, set(splits[m]))  # nor two splits
        assert np.array_equal(np.sort(steps[m]), np.arange(m.sum()))  # contiguous, unique
    # two env runners x (a game or more each) x two games
    assert len(np.unique(eids)) >= 4
    # Every row's split is its episode's hash split with the fractions the fixture collected with
    # (tests/conftest.py: test 0.5, val 0, as collections made before val existed).
    cfg = tiny_dataset.manifest["config"]
    assert (cfg["test_fraction"], cfg["val_fraction"]) == (0.5, 0.0)
    want = {e: S.split_of(e, 0.5, 0.0) for e in np.unique(eids)}
    wrong = [(i, e, s, want[e]) for i, (e, s) in enumerate(zip(eids, splits)) if s != want[e]]
    assert not wrong, f"{len(wrong)} rows with another split than their episode's, e.g. {wrong[:3]}"
    # The hash reads only an episode's position (run id, game, seed, runner, env, game number),
    # which the fixture's settings fix, so the same splits come out in every session (at this
    # writing 2 runners x 8 envs x one game each per game: Breakout 9 test / 7 train, Pong 4 / 12):
    # both splits present, and val, with a fraction of 0, absent.
    assert set(splits) == {"train", "test"}
    for game, n in tiny_dataset.manifest["games"].items():
        assert n["episodes_per_split"] == {s: len({e for e, g in zip(eids, games) if g == game and want[e] == s})
                                           for s in S.SPLITS}
    # the frame column decodes to raw screens
    f = pq.ParquetFile(parquet_files(root)[0]).read(columns=[S.FRAME])
    frames = S.frames_from_arrow(f[S.FRAME])
    assert frames.shape[1:] == (210, 160, 3) and frames.dtype == np.uint8 and frames.std() > 0
    m = tiny_dataset.manifest
    assert m["versions"]["ray"] == "2.60.0" and m["compression"].startswith("zstd")


def test_replay_reproduces_frames_bit_for_bit(tiny_dataset):
    import ale_py  # noqa: F401 - registers ALE ids

    t = pa.concat_tables([pq.ParquetFile(f).read() for f in parquet_files(tiny_dataset.root)])
    eids = t[S.EPISODE_ID].to_numpy(zero_copy_only=False)
    for game in ("Breakout", "Pong"):
        in_game = t[S.GAME].to_numpy(zero_copy_only=False) == game
        ids, counts = np.unique(eids[in_game], return_counts=True)
        eid = ids[np.argmax(counts)]  # the longest: it went through FIRE/no-op/life-loss steps
        ep = t.filter(pa.compute.equal(t[S.EPISODE_ID], eid))
        ep = ep.take(pa.compute.sort_indices(ep, [(S.STEP, "ascending")]))
        frames = S.frames_from_arrow(ep[S.FRAME])
        actions = ep[S.ACTION].to_numpy()
        assert actions[-1] == S.NO_ACTION and (actions[:-1] >= 0).all()
        assert np.array_equal(_replay(ep, actions), frames), f"{game} episode {eid} diverged"
        lives = ep[S.LIVES].to_numpy()
        assert (np.diff(lives) <= 0).all()


def test_ppo_trains_and_records_from_checkpoint(ray_local, tmp_path, monkeypatch):
    """PPO changes the policy it started from, and each recording runner acts with exactly the
    checkpoint's weights (not a freshly built module's)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModule

    import pipeline.collect as collect
    from pipeline.collect import CollectConfig, main
    from workers import rollout
    from workers.rollout import AgentConfig, train_ppo

    import torch

    # The weights the training algorithm starts from (its learner's module as built), and the
    # weights of every recording runner once `build_recorder_algo` has restored the checkpoint.
    initial: dict[str, np.ndarray] = {}
    recorded: list[list[dict[str, np.ndarray]]] = []
    ppo_config, build_recorder_algo = rollout.ppo_config, collect.build_recorder_algo

    def ppo_config_keeping_initial_weights(*args, **kwargs):
        config = ppo_config(*args, **kwargs)
        build = config.build_algo

        def build_algo(*build_args, **build_kwargs):
            algo = build(*build_args, **build_kwargs)
            if kwargs.get("record") is None:  # the training algorithm
                state = algo.learner_group.get_state(components="learner/rl_module")
                initial.update({k: np.asarray(v) for k, v in state["learner"]["rl_module"][DEFAULT_MODULE_ID].items()})
            return algo

        config.build_algo = build_algo
        return config

    def runner_weights(runner) -> dict[str, np.ndarray]:
        """Runs on an env runner (defined here: shipped by value, the workers cannot import this
        module): its RL module's weights, what `RecordingLoop` acts with."""
        return {k: np.asarray(v) for k, v in runner.module.get_state().items()}

    def recorder_keeping_its_weights(*args, **kwargs):
        algo = build_recorder_algo(*args, **kwargs)
        recorded.append(algo.env_runner_group.foreach_env_runner(runner_weights, local_env_runner=False))
        return algo

    monkeypatch.setattr(rollout, "ppo_config", ppo_config_keeping_initial_weights)
    monkeypatch.setattr(collect, "build_recorder_algo", recorder_keeping_its_weights)

    agent = AgentConfig(dim=64, train_steps=128, train_batch_size=128, minibatch_size=64,
                        num_epochs=1, learner_device="auto", learner_threads=1)
    threads, lines = torch.get_num_threads(), []
    ckpt = train_ppo("ALE/Pong-v5", agent, str(tmp_path / "ckpt" / "Pong"), num_env_runners=1,
                     cpus_per_env_runner=0.5, log=lines.append)
    assert os.path.isdir(os.path.join(ckpt, "learner_group"))
    # "auto" trains where this process can: here, no GPU, so the CPU, on the capped threads only.
    assert lines[0] == "[train ALE/Pong-v5] PPO learner on cpu, 1 CPU threads" and "iter=1" in lines[1]
    assert torch.get_num_threads() == threads  # the cap ends with training
    # PPO updated the policy: every weight and bias (encoder, policy and value heads) moved away
    # from where this training started (two Adam steps of ~lr each)
    module_dir = os.path.join(ckpt, "learner_group", "learner", "rl_module", DEFAULT_MODULE_ID)
    trained = {k: np.asarray(v) for k, v in RLModule.from_checkpoint(module_dir).get_state().items()}
    params = {k for k in trained if k.endswith((".weight", ".bias"))}
    assert initial and set(initial) == set(trained) and any(k.startswith("pi.") for k in params), sorted(trained)
    unchanged = sorted(k for k in params if np.array_equal(initial[k], trained[k]))
    assert not unchanged, f"PPO left {unchanged} as initialised"
    m = main(CollectConfig(data_root=str(tmp_path / "data"), run_id="ppo", games=("Pong",),
                           policy="ppo", checkpoint=str(tmp_path / "ckpt" / "{game}"),
                           steps_per_game=60, num_env_runners=1, agent=agent))
    assert m["games"]["Pong"]["checkpoint"] == ckpt
    assert validate_dataset(str(tmp_path / "data"))["rows"] == m["games"]["Pong"]["rows"] >= 60
    assert m["games"]["Pong"]["policy_dtype"] == ["float32"]
    # The same checkpoint recording with a bf16 forward pass (AgentConfig.inference_dtype).
    bf16 = dataclasses.replace(agent, inference_dtype="bfloat16")
    m = main(CollectConfig(data_root=str(tmp_path / "data_bf16"), run_id="ppo", games=("Pong",),
                           policy="ppo", checkpoint=str(tmp_path / "ckpt" / "{game}"),
                           steps_per_game=60, num_env_runners=1, agent=bf16))
    assert m["games"]["Pong"]["policy_dtype"] == ["bfloat16"]
    assert validate_dataset(str(tmp_path / "data_bf16"))["rows"] == m["games"]["Pong"]["rows"] >= 60
    # Both recordings' runners held the checkpoint's weights, bit for bit, when recording began
    # (an inference-only module: the encoder and the policy head, no value head).
    assert [len(runners) for runners in recorded] == [1, 1]
    acting = {k for k in trained if k.startswith(("encoder.", "pi."))}
    for weights in (w for runners in recorded for w in runners):
        assert acting <= set(weights) <= set(trained), (sorted(weights), sorted(trained))
        differ = sorted(k for k in weights if not np.array_equal(weights[k], trained[k]))
        assert not differ, f"a recording runner's {differ} are not the checkpoint's"
    with pytest.raises(ValueError, match="inference_dtype='float16'"):
        AgentConfig(inference_dtype="float16")


def test_auto_learner_falls_back_to_the_cpu_when_the_gpu_learner_cannot_build(ray_local, tmp_path, monkeypatch):
    """learner_device="auto" on a process that believes it has a GPU but cannot build RLlib's GPU
    learner (here: no CUDA device at all) trains on the CPU and says so, instead of failing."""
    from workers.rollout import AgentConfig, train_ppo

    monkeypatch.setattr(AgentConfig, "resolved_learner_device", lambda self: "cuda")
    agent = AgentConfig(dim=64, train_steps=128, train_batch_size=128, minibatch_size=64, num_epochs=1,
                        learner_device="auto")
    lines = []
    ckpt = train_ppo("ALE/Pong-v5", agent, str(tmp_path / "ckpt"), num_env_runners=1, cpus_per_env_runner=0.5,
                     log=lines.append)
    assert os.path.isdir(os.path.join(ckpt, "learner_group"))
    assert any("PPO learner on cuda failed" in x and x.endswith("training on the CPU") for x in lines), lines
    assert any("iter=1" in x for x in lines)


def test_agent_learner_device_is_checked():
    import torch

    from workers.rollout import AgentConfig

    with pytest.raises(ValueError, match="learner_device='tpu'"):
        AgentConfig(learner_device="tpu")
    with pytest.raises(ValueError, match="learner_threads=-1"):
        AgentConfig(learner_threads=-1)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert AgentConfig(learner_device="auto").resolved_learner_device() == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):
            AgentConfig(learner_device="cuda").resolved_learner_device()


def test_rerun_replaces_and_corruption_is_named(tiny_dataset, tmp_path):
    from pipeline.collect import CollectConfig, main

    root = str(tmp_path / "data")
    shutil.copytree(tiny_dataset.root, root)  # run "tiny" already there; rerun it with Pong only
    before = _scalars(root)
    cfg = CollectConfig(data_root=root, run_id="tiny", games=("Pong",), policy="random",
                        steps_per_game=80, num_env_runners=1, seed=2)
    m = main(cfg)
    after = _scalars(root)
    pong = lambda tb: tb.filter(pa.compute.equal(tb[S.GAME], "Pong"))  # noqa: E731
    assert pong(after).num_rows == m["games"]["Pong"]["rows"] < pong(before).num_rows
    assert after.num_rows - pong(after).num_rows == before.num_rows - pong(before).num_rows
    assert not os.listdir(os.path.join(root, ".staging"))
    validate_dataset(root)

    # a damaged file: its name in the error
    victim = sorted(parquet_files(os.path.join(root, "episodes", "game=Pong")))[0]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 3: len(data) // 3 + 2048] = os.urandom(2048)
    open(victim, "wb").write(bytes(data))
    with pytest.raises(S.DatasetError, match=os.path.basename(victim)):
        validate_dataset(root)
    os.remove(victim)

    # a missing column and an action outside the action space, each named
    f = parquet_files(root)[0]
    t = pq.read_table(f, partitioning=None)
    pq.write_table(t.drop_columns([S.ACTION]), f)
    with pytest.raises(S.DatasetError, match="missing column.*'action'"):
        validate_dataset(root)
    acts = t[S.ACTION].to_numpy().copy()
    acts[3] = 17
    pq.write_table(t.set_column(t.schema.get_field_index(S.ACTION), S.ACTION,
                                pa.array(acts, pa.int32())), f)
    with pytest.raises(S.DatasetError, match=r"row 3: action 17 outside"):
        validate_dataset(root)


def test_vector_envs_record_whole_games_across_lost_lives(ray_local, tmp_path):
    """Several envs per runner, games long enough to lose lives: every episode replays bit for
    bit, including one that went through EpisodicLifeEnv's life-loss resets."""
    import ale_py  # noqa: F401 - registers ALE ids

    from pipeline.collect import CollectConfig, main

    root = str(tmp_path / "data")
    m = main(CollectConfig(data_root=root, run_id="vec", games=("Breakout",), policy="random",
                           steps_per_game=700, steps_per_round=350, num_env_runners=1,
                           num_envs_per_env_runner=2, seed=3))
    g = m["games"]["Breakout"]
    assert g["rows"] >= 700 and set(g["runner_seconds"]) == {"policy", "env", "drain", "write"}
    assert g["steady_steps_per_s"] > 0  # two rounds of 350 steps: the second one is timed alone
    t = pa.concat_tables([pq.ParquetFile(f).read() for f in parquet_files(root)])
    eids = t[S.EPISODE_ID].to_numpy(zero_copy_only=False)
    # ids: <run>.<game>.s<seed>.w<runner>.<env>.<game number>~<pid>.<nonce>
    positions = {e: e.split(S.EPISODE_ID_PROCESS_SEP)[0].rsplit(".", 2)[1:] for e in np.unique(eids)}
    assert len({env for env, _ in positions.values()}) == 2  # two recorder instances (envs)
    lost = [e for e in np.unique(eids)
            if np.ptp(t.filter(pa.compute.equal(t[S.EPISODE_ID], e))[S.LIVES].to_numpy()) > 0]
    assert lost, "no episode lost a life: the replay below would not cover life-loss resets"
    # Later games of an env start from an unseeded reset (no ROM reload): they must replay too.
    assert any(int(game) >= 1 for _, game in positions.values()), "no env played a second game"
    for eid in np.unique(eids):
        ep = t.filter(pa.compute.equal(t[S.EPISODE_ID], eid))
        ep = ep.take(pa.compute.sort_indices(ep, [(S.STEP, "ascending")]))
        assert np.array_equal(ep[S.STEP].to_numpy(), np.arange(ep.num_rows))
        frames, actions = S.frames_from_arrow(ep[S.FRAME]), ep[S.ACTION].to_numpy()
        assert np.array_equal(_replay(ep, actions), frames), f"episode {eid} diverged"


def test_frame_column_round_trips_and_names_bad_frames(tmp_path):
    """Frames are stored as one raw-bytes value each; they read back bit for bit through Parquet
    (several row groups, so several chunks), the older tensor layout still reads, and a frame of
    the wrong size or type is named with its row."""
    from ray.data.extensions import ArrowTensorArray

    from workers.rollout import write_episode_table

    f = np.random.default_rng(0).integers(0, 256, (5, *S.FRAME_SHAPE), dtype=np.uint8)
    col = S.frames_to_arrow(f)
    assert col.type == S.FRAME_TYPE and len(col) == 5 and len(col[2].as_py()) == S.FRAME_BYTES
    back = S.frames_from_arrow(col)
    assert np.array_equal(back, f) and np.shares_memory(back, f)  # a view, not a copy
    assert np.array_equal(S.frames_from_arrow(col.slice(2, 2)), f[2:4])
    assert S.frames_from_arrow(S.frames_to_arrow(f[:0])).shape == (0, *S.FRAME_SHAPE)

    path = str(tmp_path / "x.parquet")
    write_episode_table(pa.table({S.FRAME: col, S.STEP: pa.array(range(5), pa.int32())}), path)
    meta = pq.ParquetFile(path).metadata
    frame_chunk = meta.row_group(0).column(0)
    assert frame_chunk.path_in_schema == S.FRAME and frame_chunk.compression == "ZSTD"
    assert not frame_chunk.is_stats_set and not frame_chunk.has_dictionary_page
    table = pq.read_table(path)
    assert np.array_equal(S.frames_from_arrow(table[S.FRAME]), f)
    chunked = pa.chunked_array([col.slice(0, 2), col.slice(2)])
    assert np.array_equal(S.frames_from_arrow(chunked), f)

    legacy = ArrowTensorArray.from_numpy(f)  # the tensor layout of datasets written earlier
    assert np.array_equal(S.frames_from_arrow(legacy), f)
    assert np.array_equal(S.frames_from_arrow(legacy.storage), f)

    mixed = pa.concat_arrays([col.slice(0, 3), S.frames_to_arrow(np.zeros((1, 84, 84, 3), np.uint8))])
    with pytest.raises(S.DatasetError, match=r"part-7: column 'frame' row 3 holds 21168 bytes"):
        S.frames_from_arrow(mixed, "part-7")
    with pytest.raises(S.DatasetError, match=r"column 'frame' has type string"):
        S.frames_from_arrow(pa.array(["a"]), "part-7")
    with pytest.raises(S.DatasetError, match=r"null at row 1"):
        S.frames_from_arrow(pa.array([b"x", None], pa.large_binary()))


def test_recorder_applies_a_seed_once_without_sticky_actions_and_always_with_them():
    """A seeded ALE reset reloads the ROM; without sticky actions only an env's first reset (or one
    given a seed) is seeded. Every game still records a reset seed."""
    import ale_py  # noqa: F401 - registers ALE ids

    from workers.atari import EnvSettings, RawFrameRecorder, make_raw_env

    class SeedSpy(gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            self.seeds.append(seed)
            return self.env.reset(seed=seed, options=options)

    for sticky, every_game in ((0.0, False), (0.25, True)):
        settings = EnvSettings(repeat_action_probability=sticky)
        spy = SeedSpy(make_raw_env("ALE/Pong-v5", settings))
        spy.seeds = []
        rec = RawFrameRecorder(spy, env_id="ALE/Pong-v5", settings=settings, run_id="t", seed=0,
                               worker_index=0, test_fraction=0.0)
        for _ in range(3):
            rec.reset()
            rec.step(0)
        rec.reset(seed=7)
        rec.flush_open()
        t = rec.drain()
        assert spy.seeds[0] is not None and spy.seeds[3] == 7
        assert [s is not None for s in spy.seeds[1:3]] == [every_game] * 2, (sticky, spy.seeds)
        per_game = {e: sd for e, sd in zip(t[S.EPISODE_ID].to_pylist(), t[S.RESET_SEED].to_pylist())}
        assert len(per_game) == 4 and per_game[max(per_game)] == 7


def test_a_rerun_of_the_same_settings_holds_out_the_same_games(monkeypatch):
    """Episode ids end in a process part (pid, nonce) that differs between collections; the split
    hashes what precedes it, so a second collection with the same settings (run id, game, seed,
    runner, env, game number) assigns every game the same split under a different id."""
    import itertools

    import ale_py  # noqa: F401 - registers ALE ids

    import workers.atari as atari
    from workers.atari import EnvSettings, RawFrameRecorder, make_raw_env

    runs = []
    for _ in range(2):  # two "processes": each numbers its envs from 0
        monkeypatch.setattr(atari, "_instances", itertools.count())
        settings = EnvSettings()
        rec = RawFrameRecorder(make_raw_env("ALE/Pong-v5", settings), env_id="ALE/Pong-v5", settings=settings,
                               run_id="r", seed=3, worker_index=2, test_fraction=0.5)
        for _ in range(8):
            rec.reset()
            rec.step(0)
        rec.flush_open()
        t = rec.drain()
        per_game = dict(zip(t[S.EPISODE_ID].to_pylist(), t[S.SPLIT].to_pylist()))
        runs.append(sorted(per_game.items(), key=lambda kv: int(kv[0].split(S.EPISODE_ID_PROCESS_SEP)[0].rsplit(".", 1)[1])))
    (ids_a, splits_a), (ids_b, splits_b) = (tuple(zip(*r)) for r in runs)
    assert len(ids_a) == 8 and set(ids_a).isdisjoint(ids_b)  # unique ids across the two collections
    assert [i.split(S.EPISODE_ID_PROCESS_SEP)[0] for i in ids_a] == [i.split(S.EPISODE_ID_PROCESS_SEP)[0] for i in ids_b]
    assert ids_a[0].startswith("r.Pong.s3.w2.0.0~")
    assert splits_a == splits_b and set(splits_a) == {"train", "test"}
    assert all(S.split_of(i, 0.5) == s for i, s in zip(ids_a, splits_a))
    assert S.split_of("r.Pong.s3.w2.0.5~111.aaaaaa", 0.5) == S.split_of("r.Pong.s3.w2.0.5~222.bbbbbb", 0.5)
