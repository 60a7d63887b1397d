"""Smoke tests of the benchmark scripts: each `main(cfg)` with the tiniest settings on CPU prints a
Markdown table with its columns and returns rows of finite, positive measurements.

Windows are real Breakout frames (crops, to keep CPU time down); the pipeline mode of
bench_train feeds them through a real local Ray Data pipeline (`iter_torch_batches`).
"""

from __future__ import annotations

import csv
import functools
import math

import numpy as np
import json

import pytest
import torch
from ale_windows import ale_windows

from benchmarks.bench_generate import BenchGenerateConfig, compiled, random_world_model
from benchmarks.bench_generate import main as generate_main
from benchmarks.bench_multistep import BenchMultistepConfig, frame_bound, verdict
from benchmarks.bench_multistep import main as multistep_main
from benchmarks.bench_train import BenchTrainConfig, step_flops
from benchmarks.bench_train import main as train_main
from benchmarks.common import kernel_kind, kernel_times, markdown_table, profile_table, time_by_kind, time_calls
from models.lpips import weights_path
from models.stdit import STDiT_models
from models.vae import VAE_models
from pipeline.cli import parse_config
from workers.world_model import save_world_model, world_model_meta

CROP = (slice(96, 144), slice(48, 112))  # 48x64 of Breakout's paddle/ball area
_ale_windows = functools.partial(ale_windows, crop=CROP)


def _positive(rows, keys):
    for r in rows:
        for k in keys:
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)


def _table_header(out: str, columns) -> None:
    assert "| " + " | ".join(columns) + " |" in out, out


# -- helpers -----------------------------------------------------------------------------------------
def test_parse_config_types_and_tuples():
    cfg = parse_config(BenchTrainConfig, ["--presets", "tiny", "S", "--batch-sizes", "2", "4", "--no-bf16",
                                          "--peak-flops", "1e12"])
    assert cfg.presets == ("tiny", "S") and cfg.batch_sizes == (2, 4) and cfg.bf16 is False
    assert cfg.peak_flops == 1e12 and cfg.compile == ("eager", "compile")
    with pytest.raises(ValueError, match="presets"):
        BenchTrainConfig(presets=("nope",))


def test_markdown_table_formats_missing_as_na():
    out = markdown_table([{"a": 1.23456, "b": None}, {"a": 12345.6}], ["a", "b"])
    assert out.splitlines() == ["| a | b |", "| --- | --- |", "| 1.235 | n/a |", "| 12,346 | n/a |"]


def test_profile_table_lists_the_ops_run():
    a = torch.randn(64, 64)
    table = profile_table(lambda: (a @ a).relu(), torch.device("cpu"), calls=2)
    assert "aten::mm" in table and "aten::relu" in table and "Self CPU" in table
    kinds = table.split("CPU self time by kind of op, 2 calls:")[1]
    assert "| matrix products |" in kinds and "| element-wise and reductions |" in kinds


def test_kernel_kinds_of_an_h200_profile_sum_the_trace_kernels_by_kind():
    """Kernel names as a compiled DiT step's trace holds them; copies and fills come from their
    own trace categories; CPU ops of the trace are not GPU time."""
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "nvjet_sm90_tst_128x192_64x5_2x1_v_bz_coopB_NNN", "dur": 100.0},
        {"cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "dur": 50.0},
        {"cat": "kernel", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "dur": 60.0},
        {"cat": "kernel", "name": "triton_per_fused_add_mul_native_layer_norm_backward_12", "dur": 40.0},
        {"cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor>", "dur": 10.0},
        {"cat": "kernel", "name": "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "dur": 20.0},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 20.0},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 999.0},
        {"ph": "M", "name": "process_name"},
    ]}
    timed = kernel_times(trace)
    assert len(timed) == 7 and ("aten::mm", 999.0) not in timed
    rows = {r["kind"]: r for r in time_by_kind(timed)}
    assert rows["matrix products"]["ms"] == pytest.approx(0.150) and rows["matrix products"]["calls"] == 2
    assert rows["attention"]["share_pct"] == pytest.approx(20.0)
    assert rows["Triton (Inductor's fused kernels)"]["ms"] == pytest.approx(0.040)
    assert rows["optimizer"]["ms"] == pytest.approx(0.020) and rows["copies and fills"]["ms"] == pytest.approx(0.030)
    assert sum(r["share_pct"] for r in rows.values()) == pytest.approx(100.0)
    assert [r["kind"] for r in time_by_kind(timed)][0] == "matrix products"  # largest first
    assert kernel_kind("some_custom_kernel") == "other"


def test_time_calls_times_back_to_back_calls_then_latency_calls_apart(monkeypatch):
    """mean_s comes from `iters` calls with one synchronisation at the end (a training loop's
    queue), min_s from the extra calls, each synchronised; none with latency_calls=0."""
    import benchmarks.common as common

    events = []
    monkeypatch.setattr(common, "sync", lambda device: events.append("sync"))
    fn = lambda: events.append("call")  # noqa: E731
    t = time_calls(fn, torch.device("cpu"), 5, latency_calls=2)
    assert events == ["call"] * 5 + ["sync"] + ["call", "sync"] * 2
    assert t["mean_s"] > 0 and math.isfinite(t["min_s"])
    events.clear()
    t = time_calls(fn, torch.device("cpu"), 3, latency_calls=0)
    assert events == ["call"] * 3 + ["sync"] and math.isnan(t["min_s"])
    with pytest.raises(ValueError, match="iters"):
        time_calls(fn, torch.device("cpu"), 0)


def test_step_flops_scale_with_batch():
    cfg = BenchTrainConfig(presets=("tiny",))
    tcfg = cfg.train_config("tiny", 1, False)
    one, two = step_flops(tcfg, (1, 8, 4, 12, 10), 4), step_flops(tcfg, (2, 8, 4, 12, 10), 4)
    assert one > 0 and two == pytest.approx(2 * one, rel=0.02)


# -- bench_train ---------------------------------------------------------------------------------------
def test_train_synthetic(capsys, tmp_path):
    out = tmp_path / "train.csv"
    rows = train_main(BenchTrainConfig(presets=("tiny",), batch_sizes=(2,), compile=("eager",), height=32, width=32,
                                       warmup=1, steps=2, device="cpu", out=str(out)))
    printed = capsys.readouterr().out
    assert "device: " in printed
    _table_header(printed, ["preset", "params_M", "compile", "batch", "latents", "step_ms", "samples_per_s"])
    assert len(rows) == 1 and rows[0]["latents"] == "8x4x8x8"  # 4+4 frames, 32x32 / 4
    _positive(rows, ["params_M", "step_ms", "samples_per_s", "gflops_per_step", "achieved_tflops"])
    assert rows[0]["mfu_pct"] is None and rows[0]["gpu_busy_pct"] is None  # no peak/counter on CPU
    assert rows[0]["samples_per_s"] == pytest.approx(2 / (rows[0]["step_ms"] / 1e3))
    with open(out) as fh:
        assert next(csv.DictReader(fh))["preset"] == "tiny"
    meta = json.loads((tmp_path / "train.meta.json").read_text())  # every CSV table has its .meta.json
    assert {"commit", "command", "gpu", "date", "device", "config"} <= set(meta) and meta["commit"]
    assert meta["device"].endswith("threads)") and "BenchTrainConfig(" in meta["config"]


def test_train_synthetic_profiles_the_first_setting_of_each_compile_mode(capsys):
    """--profile prints one profiler table per compile mode, of its first setting."""
    train_main(BenchTrainConfig(presets=("tiny",), batch_sizes=(2, 3), compile=("eager",), height=32, width=32,
                                warmup=1, steps=1, device="cpu", profile=True))
    printed = capsys.readouterr().out
    assert printed.count("\nprofile: ") == 1 and "profile: tiny batch 2 eager" in printed
    train_main(BenchTrainConfig(presets=("tiny",), batch_sizes=(2,), compile=("eager",), height=32, width=32,
                                warmup=1, steps=1, device="cpu"))
    assert "profile: " not in capsys.readouterr().out


def test_train_synthetic_horizon_mix_takes_each_length_in_turn():
    """The gpu preset's mix of generated lengths (T in 1, 2, 4, one per step): each step's latents
    have n_cond + T frames, and the FLOPs per step are the mix's mean, between T=1's and T=4's."""
    kw = dict(presets=("tiny",), batch_sizes=(2,), compile=("eager",), height=32, width=32, warmup=1, steps=3,
              device="cpu")
    (mix,) = train_main(BenchTrainConfig(horizon_mix=(1, 2, 4), **kw))
    (t1,) = train_main(BenchTrainConfig(horizon=1, **kw))
    (t4,) = train_main(BenchTrainConfig(**kw))
    assert mix["latents"] == "5+6+8x4x8x8"
    assert t1["gflops_per_step"] < mix["gflops_per_step"] < t4["gflops_per_step"]
    tcfg = BenchTrainConfig(presets=("tiny",)).train_config("tiny", 2, False)
    mean = sum(step_flops(tcfg, (2, 4 + T, 4, 8, 8), 4, T) for T in (1, 2, 4)) / 3
    assert mix["gflops_per_step"] == pytest.approx(mean / 1e9)
    with pytest.raises(ValueError, match="horizon_mix"):
        BenchTrainConfig(horizon_mix=(1, 8))


@pytest.fixture(scope="module")
def ray_windows(ray_local):
    frames, actions = _ale_windows(num=12, length=5)
    return ray_local.data.from_items([{"frames": f, "actions": a} for f, a in zip(frames, actions)])


def test_train_pipeline_fed_by_ray_data(ray_windows, capsys):
    cfg = BenchTrainConfig(mode="pipeline", data_root="unused: dataset given", presets=("tiny",), batch_sizes=(2,),
                           compile=("eager",), n_cond=4, horizon=1, vae_preset="tiny", warmup=1, steps=2,
                           device="cpu")
    rows = train_main(cfg, dataset=ray_windows)
    printed = capsys.readouterr().out
    _table_header(printed, ["preset", "compile", "batch", "window", "fed_samples_per_s", "resident_samples_per_s",
                            "input_efficiency_pct", "data_wait_pct"])
    _positive(rows, ["fed_samples_per_s", "resident_samples_per_s", "input_efficiency_pct"])
    assert rows[0]["window"] == "(5, 48, 64, 3)"
    assert 0 <= rows[0]["data_wait_pct"] <= 100 and isinstance(rows[0]["input_bound"], bool)


# -- bench_generate ------------------------------------------------------------------------------------
def test_generate_random_model(capsys, tmp_path):
    rows = generate_main(BenchGenerateConfig(dit_preset="tiny", vae_preset="tiny", batch_sizes=(1, 2),
                                             sample_steps=(1,), height=32, width=32, warmup=1, iters=1,
                                             device="cpu", out=str(tmp_path / "gen.json")))
    printed = capsys.readouterr().out
    _table_header(printed, ["compile", "sample_steps", "batch", "frames_per_call", "ms_per_call", "min_ms_per_call",
                            "frames_per_s"])
    assert [r["batch"] for r in rows] == [1, 2] and all(r["frames_per_call"] == 4 for r in rows)
    _positive(rows, ["ms_per_call", "min_ms_per_call", "frames_per_s"])
    for r in rows:
        assert r["frames_per_s"] == pytest.approx(r["batch"] * 4 / (r["ms_per_call"] / 1e3))
    written = json.loads((tmp_path / "gen.json").read_text())
    assert len(written["rows"]) == 2 and {"commit", "command", "gpu", "date", "device"} <= set(written["meta"])
    assert not (tmp_path / "gen.meta.json").exists()  # a JSON table carries its meta inside


def test_generate_cudagraphs_mode_predicts_what_eager_does():
    """The compiled world model of the "cudagraphs" mode (torch.compile, mode="reduce-overhead"; on
    the CPU it compiles without graphs) generates the eager model's frames from the same noise."""
    cfg = BenchGenerateConfig(dit_preset="tiny", vae_preset="tiny", height=32, width=32, device="cpu")
    torch.manual_seed(0)
    eager = random_world_model(cfg, torch.device("cpu"))
    for p in eager.dit.parameters():  # the output layer starts at zero: give the DiT a non-zero velocity
        p.data.normal_(0, 0.05)
    fast = compiled(eager, "cudagraphs")
    cond = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randint(0, 18, (2, 4))
    a = eager.predict(cond, actions, 4, generator=torch.Generator().manual_seed(1))
    b = fast.predict(cond, actions, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 32, 32, 3) and a.float().std() > 0
    assert (a.int() - b.int()).abs().max() <= 1  # same frames, up to a rounding step of fused kernels
    with pytest.raises(ValueError, match="unknown"):
        BenchGenerateConfig(compile=("graphs",))


# -- bench_multistep ------------------------------------------------------------------------------------
def _save_model(path, horizon: int, trained_horizons: tuple[int, ...] = ()) -> str:
    torch.manual_seed(horizon)
    vae, dit = VAE_models["tiny"](), STDiT_models["tiny"]()
    meta = world_model_meta(dit, latent_scale=1.0, n_cond=4, horizon=horizon, action_mode="future", sample_steps=1,
                            trained_horizons=trained_horizons)
    return str(save_world_model(path, vae, dit, meta))


def test_multistep_two_saved_models(tmp_path, capsys):
    if not weights_path().is_file():
        pytest.fail(f"LPIPS weights missing at {weights_path()}: run `python scripts/setup_lpips.py`")
    multi, single = _save_model(tmp_path / "t4", 4), _save_model(tmp_path / "t1", 1)
    frames, actions = _ale_windows(num=2, length=4 + 8)
    out = tmp_path / "multistep.csv"
    rows = multistep_main(BenchMultistepConfig(multi_frame=multi, single_step=single, horizons=(4, 8),
                                               batch_size=2, timing_iters=1, device="cpu", out=str(out)),
                          windows=(frames, actions))
    printed = capsys.readouterr().out
    _table_header(printed, ["method", "horizon", "chunks", "sample_steps", "frames_per_s", "gpu_busy_pct",
                            "mse", "mse_std", "psnr", "psnr_std", "lpips", "lpips_std", "psnr_of_mean_mse",
                            "num_windows"])
    methods = [(r["method"], r["horizon"]) for r in rows]
    assert methods == [("multi-frame T=4", 4), ("multi-frame T=4", 8), ("single-step T=1", 4),
                       ("single-step T=1", 8), ("copy-last", 4), ("copy-last", 8)]
    assert [r.get("chunks") for r in rows[:4]] == [1, 2, 4, 8]
    _positive(rows[:4], ["frames_per_s", "mse", "psnr", "lpips"])
    _positive(rows[4:], ["psnr"])
    assert all(r["num_windows"] == 2 for r in rows)
    assert "the 3x target" in printed and "horizon 8:" in printed
    with open(out) as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert json.loads((tmp_path / "multistep.meta.json").read_text())["config"].count("split='val'") == 1


def test_multistep_one_model_trained_for_both_lengths(tmp_path):
    """One model trained for T in {1, 4} (the pipeline's): the single-step rows roll it out one
    frame per chunk, and say so."""
    wm = _save_model(tmp_path / "t14", 4, trained_horizons=(1, 4))
    frames, actions = _ale_windows(num=2, length=4 + 8)
    rows = multistep_main(BenchMultistepConfig(multi_frame=wm, horizons=(4, 8), batch_size=2, timing_iters=1,
                                               lpips=False, device="cpu"), windows=(frames, actions))
    chunks = {(r["method"], r["horizon"]): r.get("chunks") for r in rows}
    assert chunks[("multi-frame T=4", 4)] == 1 and chunks[("multi-frame T=4", 8)] == 2
    assert chunks[("single-step T=1", 4)] == 4 and chunks[("single-step T=1", 8)] == 8


def test_multistep_reads_the_val_split_unless_told(tiny_split_root):
    """Settings are chosen on val: the windows come from it by default (tiny_split_root's val holds
    copies of the train episodes, never the test one's frames), and a split that is none fails."""
    from dataclasses import replace

    from benchmarks.bench_multistep import read_windows

    with pytest.raises(ValueError, match=r"split='tst'; splits are \['train', 'val', 'test'\]"):
        BenchMultistepConfig(split="tst")
    cfg = BenchMultistepConfig(data_root=tiny_split_root, game="Breakout", max_windows=2, stride=8)
    assert cfg.split == "val"
    val, train, test = (read_windows(replace(cfg, split=s), 8)[0] for s in ("val", "train", "test"))
    assert len(val) == 2 and np.array_equal(val, train)
    assert not (val.shape == test.shape and np.array_equal(val, test))


def test_verdict_reads_speed_and_every_metric():
    rows = [{"method": "m", "horizon": 4, "frames_per_s": 30.0, "mse": 10.0, "psnr": 30.0},
            {"method": "s", "horizon": 4, "frames_per_s": 10.0, "mse": 11.0, "psnr": 31.0}]
    (line,) = verdict(rows, "m", "s", ["mse", "psnr"])
    assert "3.00x" in line and "meets" in line and "worse on psnr" in line
    (line,) = verdict(rows, "m", "s", ["mse", "psnr"], bounds={4: 2.5})
    assert "3.00x of at most 2.50x by frames processed" in line


def test_frame_bound_counts_the_condition_frames_each_call_processes():
    """4 condition frames: chunks of 4 process 8 frames for 4, chunks of 1 process 5 for 1."""
    assert frame_bound(4, 4, 4, 4, 1) == pytest.approx(2.5)
    assert frame_bound(16, 4, 4, 4, 1) == pytest.approx(2.5)
    assert frame_bound(6, 4, 4, 4, 1) == pytest.approx(6 * 5 / (2 * 8))  # a partial last chunk costs a whole one
    assert frame_bound(4, 8, 4, 8, 1) == pytest.approx(3.0)  # 3x needs 8 condition frames
    assert frame_bound(4, 4, 1, 4, 1) == pytest.approx(1.0)


def test_collect_codecs_and_env_profile(tmp_path):
    """bench_collect's pieces on real frames: the stored layout round-trips through the codec
    table, and the env-stack profile finds the emulator step among its costs."""
    import ale_py  # noqa: F401 - registers ALE ids
    import numpy as np
    import pyarrow as pa

    from benchmarks.bench_collect import codec_bytes_per_frame, profile_env_stack
    from workers import schema as S
    from workers.atari import EnvSettings, make_raw_env
    from workers.rollout import write_episode_table

    env = make_raw_env("ALE/Breakout-v5", EnvSettings())
    frames = [env.reset(seed=0)[0]]
    for a in np.random.default_rng(0).integers(0, 4, 63):
        frames.append(env.step(int(a))[0])
    path = str(tmp_path / "f.parquet")
    write_episode_table(pa.table({S.FRAME: S.frames_to_arrow(np.stack(frames))}), path)
    codecs = codec_bytes_per_frame([path])
    assert set(codecs) == {"stored", "snappy", "zstd-1", "zstd-3", "zstd-9", "tensor zstd-3", "png"}
    assert codecs["stored"][0] < 1024 < codecs["snappy"][0]  # zstd keeps a frame under 1 KB
    assert all(ms > 0 for _, ms in codecs.values())

    prof = profile_env_stack("ALE/Breakout-v5", vector_steps=20, num_envs=2)
    names = [n for n, _ in prof]
    assert "env.py:step" in names and names[-1] == "total (profiled)"
    assert prof[-1][1] >= sum(ms for _, ms in prof[:-1])


def test_probe_vae_grid_scores_each_factor_on_held_out_ale_frames(tmp_path, capsys):
    from benchmarks.probe_vae_grid import ProbeVAEGridConfig
    from benchmarks.probe_vae_grid import main as probe_main

    out = tmp_path / "probe.csv"
    rows = probe_main(ProbeVAEGridConfig(game="Breakout", frames=48, held_out=16, train_s=1.0, batch_size=2,
                                         device="cpu", out=str(out)))
    assert [(r["factor"], r["latent"]) for r in rows] == [(4, "8x53x40"), (2, "8x105x80")]
    for r in rows:
        assert r["steps"] >= 1 and math.isfinite(r["mse"]) and r["mse"] > 0
        # the moving pixels are a part of the frame, and of its error
        assert 0 < r["moving_pixels_pct"] < 100 and 0 <= r["sprite_share_pct"] <= 100
    assert "| Breakout | 2 | l1 | 8x105x80 |" in capsys.readouterr().out
    assert len(list(csv.DictReader(out.open()))) == 2
    with pytest.raises(ValueError, match="held_out=48 must be below frames=48"):
        probe_main(ProbeVAEGridConfig(frames=48, held_out=48))


def test_bench_ddp_summary_rates_efficiency_and_loss_at_equal_samples(tmp_path):
    """bench_ddp reads each run's metrics: samples/s from the logged steps after the first (start-up
    left out), efficiency against the fewest workers, and the loss where every run has seen the
    same number of samples."""
    from benchmarks.bench_ddp import BenchDDPConfig, dit_settings, read_metrics, summarise

    def metrics(path, world, step_s, losses):  # one logged row every 10 steps
        lines = [{"time": 0.0, "event": "start", "step": 0, "world_size": world}]
        lines += [{"time": 5.0 + i * 10 * step_s, "step": 10 * (i + 1), "train/loss": loss} for i, loss in enumerate(losses)]
        path.write_text("\n".join(json.dumps(r) for r in lines))
        return read_metrics(path)

    # Strong scaling, 8 clips a step: 1 worker at 0.1 s a step, 2 workers at 0.0625 s a step.
    one = metrics(tmp_path / "w1.jsonl", 1, 0.1, [1.0, 0.8, 0.6, 0.5])
    two = metrics(tmp_path / "w2.jsonl", 2, 0.0625, [1.1, 0.8, 0.6, 0.4, 0.3, 0.2])
    rows = summarise({1: one, 2: two}, {1: 8, 2: 4})
    assert [r["workers"] for r in rows] == [1, 2] and rows[1]["world_size"] == 2
    assert rows[0]["samples_per_s"] == pytest.approx(80.0) and rows[1]["samples_per_s"] == pytest.approx(128.0)
    assert rows[1]["efficiency_pct"] == pytest.approx(80.0) and rows[0]["efficiency_pct"] == pytest.approx(100.0)
    # The fewest samples any run saw: 40 steps x 8 = 320; at 25 % (80 samples = step 10) and 100 %.
    assert rows[0]["loss_at_80"] == pytest.approx(1.0) and rows[1]["loss_at_80"] == pytest.approx(1.1)
    assert rows[0]["loss_at_320"] == pytest.approx(0.5) and rows[1]["loss_at_320"] == pytest.approx(0.4)
    assert rows[1]["steps"] == 60

    sets = dit_settings(BenchDDPConfig(global_batch=8, max_train_s=60, use_gpu=True), 2)
    assert "dit.batch_size=4" in sets and "dit.num_workers=2" in sets and "dit.use_gpu=true" in sets
    assert "dit.lr_cooldown=0" in sets and "dit.max_train_s=60" in sets
    with pytest.raises(ValueError, match="global_batch=8 does not divide by 3"):
        dit_settings(BenchDDPConfig(global_batch=8), 3)
    (tmp_path / "short.jsonl").write_text(json.dumps({"time": 1.0, "step": 5, "train/loss": 1.0}))
    with pytest.raises(ValueError, match="short.jsonl: 1 logged steps"):
        read_metrics(tmp_path / "short.jsonl")


def test_probe_copy_last_scores_windows_within_episodes_on_real_ale_play(tmp_path, capsys):
    """probe_copy_last: copy-last's window MSE from real ALE frames, checked window by window
    against a direct computation; no window spans a reset; a coarser frame skip changes the play."""
    from benchmarks.probe_copy_last import ProbeCopyLastConfig, copy_last_mse
    from benchmarks.probe_copy_last import main as probe_main
    from benchmarks.probe_vae_grid import play_episodes

    frames, episode = play_episodes("Breakout", 40, 0, frameskip=1)
    assert frames.shape == (40, 210, 160, 3) and (np.diff(episode) >= 0).all()
    # Two plays glued into one: the second starts a new episode, so no window may span the seam.
    glued, eps = np.concatenate([frames, frames[::-1]]), np.concatenate([episode, episode + episode[-1] + 1])
    for horizon in (1, 4):
        want = [np.mean([((glued[i + t].astype(np.float64) - glued[i]) ** 2).mean() for t in range(1, horizon + 1)])
                for i in range(len(glued) - horizon) if eps[i] == eps[i + horizon]]
        mean, median, windows = copy_last_mse(glued, eps, horizon)
        assert windows == len(want) == 80 - horizon - horizon  # the windows of each half alone
        assert mean == pytest.approx(np.mean(want), rel=1e-5) and median == pytest.approx(np.median(want), rel=1e-5)
    out = tmp_path / "copy_last.csv"
    rows = probe_main(ProbeCopyLastConfig(games=("Breakout",), frameskips=(4, 1), frames=40, horizons=(1, 4),
                                          out=str(out)))
    assert [(r["frameskip"], r["T"]) for r in rows] == [(4, 1), (4, 4), (1, 1), (1, 4)]
    assert all(r["copy_last_mse"] > 0 for r in rows) and rows[0]["copy_last_mse"] != rows[2]["copy_last_mse"]
    assert rows[1]["paper_model_mse"] == pytest.approx(14.3638)
    assert "| Breakout | 1 | 4 |" in capsys.readouterr().out
    assert len(list(csv.DictReader(out.open()))) == 4
    with pytest.raises(ValueError, match="frameskips"):
        probe_main(ProbeCopyLastConfig(frameskips=(0,)))
