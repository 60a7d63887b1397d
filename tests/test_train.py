"""Ray Train loops on a real local Ray cluster (2 CPUs), CPU DDP over gloo, tiny presets.

The mechanics (DDP loss going down, crash survival, interruption and resume, the non-finite guard)
run `pipeline.train.fit` on a Ray Dataset of windows of real Breakout frames; the drivers
(`train_vae_main`, `train_dit_main`) run end to end on the tiny collected dataset of conftest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ale_windows import ale_windows
import ray
import torch
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker, local_tracking_uri
from pipeline.train import fit
from workers.train_common import NonFiniteLossError, metrics_path, read_metrics
from workers.train_vae import TrainVAEConfig
from workers.train_vae import train_loop_per_worker as vae_loop


@pytest.fixture(scope="module")
def windows_ds(ray_local):
    frames, actions = ale_windows(num=16, length=4)
    return ray.data.from_items([{"frames": f, "actions": a} for f, a in zip(frames, actions)])


def _cfg(tmp: Path, **kw) -> TrainVAEConfig:
    base = dict(run_dir=str(tmp), name="vae", steps=8, batch_size=2, clip_length=4, lr=2e-3,
                warmup_steps=1, log_every=1, checkpoint_every=2, num_workers=2, cpus_per_worker=0.5,
                max_failures=0, vae_preset="tiny", data_loader="stream")
    return TrainVAEConfig(**{**base, **kw})


def _fit(cfg, ds, side=None):
    with Tracker(cfg.run_dir, cfg.name) as tracker:
        return fit(vae_loop, cfg, ds, tracker, side_datasets=side), tracker.run_id


def _starts(cfg) -> list[int]:
    return [r["step"] for r in read_metrics(metrics_path(cfg.run_dir, cfg.name)) if r.get("event") == "start"]


def test_interrupted_run_resumes_its_step_count(tmp_path, windows_ds):
    cfg = _cfg(tmp_path, steps=6, fail_at_step=4, max_failures=0, num_workers=1, cpus_per_worker=1.0)
    with pytest.raises(Exception):  # no retries allowed: the crash ends the first attempt
        _fit(cfg, windows_ds)
    assert _starts(cfg) == [0]
    result, run_id = _fit(cfg, windows_ds)  # same name: resumes from the last checkpoint
    starts = _starts(cfg)
    assert len(starts) == 2 and starts[1] in (2, 4), starts  # 4 unless its report was in flight
    steps = [r["step"] for r in read_metrics(metrics_path(tmp_path, "vae")) if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=False)["step"] == 6
    runs = MlflowClient(local_tracking_uri(tmp_path)).search_runs(
        [MlflowClient(local_tracking_uri(tmp_path)).get_experiment_by_name("atari-world-model").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, windows_ds):
    cfg = _cfg(tmp_path, steps=8, nan_at_step=3, num_workers=1, cpus_per_worker=1.0)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*Last good checkpoint: /") as err:
        _fit(cfg, windows_ds)
    ckpt = str(err.value).split("Last good checkpoint: ")[1]
    assert torch.load(Path(ckpt) / "state.pt", weights_only=False)["step"] == 2
    steps = [r["step"] for r in read_metrics(metrics_path(tmp_path, "vae")) if "event" not in r]
    assert steps == [1, 2, 3]  # steps 0..2 ran; the NaN step updated nothing
    for name in ("fail_at_step", "nan_at_step"):
        assert name in TrainVAEConfig.__dataclass_fields__


def test_lr_factor_warms_up_then_cools_down_over_the_last_share_of_the_run():
    from workers.train_common import lr_factor

    cfg = TrainVAEConfig(steps=10, warmup_steps=2, lr_cooldown=0.5)
    assert [round(lr_factor(s, cfg), 3) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    # with a time budget, the elapsed share counts when it is further than the steps' share
    assert lr_factor(1, cfg, time_frac=0.9) == pytest.approx(0.2)
    assert lr_factor(1, cfg, time_frac=1.0) == 0.0
    assert lr_factor(9, TrainVAEConfig(steps=10, warmup_steps=1)) == 1.0  # no cooldown: constant


def test_time_budget_stops_both_ranks_at_one_step_and_the_lr_cools_down(tmp_path, windows_ds):
    """max_train_s with two DDP ranks (the GPU presets' budgets): the ranks agree when to stop (no
    rank left waiting in a collective) and on the cooldown's time share (one learning rate)."""
    cfg = _cfg(tmp_path, steps=100_000, max_train_s=8.0, lr_cooldown=0.5, checkpoint_every=100_000)
    result, _ = _fit(cfg, windows_ds)
    lines = read_metrics(metrics_path(tmp_path, "vae"))
    rows = [r for r in lines if "train/lr" in r]
    budget = [json.loads(x) for x in metrics_path(tmp_path, "vae").read_text().splitlines()
              if '"time_budget"' in x]
    assert len(budget) == 1 and budget[0]["step"] == rows[-1]["step"] < cfg.steps
    assert torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=False)["step"] == rows[-1]["step"]
    lrs = [r["train/lr"] for r in rows]
    assert lrs[0] == pytest.approx(cfg.lr)  # before any clock check: the peak rate
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), lrs  # the cooldown only ever lowers it
    assert lrs[-1] < 0.25 * cfg.lr, lrs  # and it ends near 0 as the budget runs out


def test_unknown_setting_is_an_error():
    from models.config import config_from_dict

    with pytest.raises(TypeError, match="unknown TrainVAEConfig settings \\['stepz'\\]"):
        config_from_dict(TrainVAEConfig, {"stepz": 3})
    assert config_from_dict(TrainVAEConfig, {"betas": [0.8, 0.9]}).betas == (0.8, 0.9)


def test_device_loader_ddp_reads_each_shard_once_and_survives_a_crash(tmp_path, tiny_dataset, windows_ds):
    """The default "device" loader: two DDP workers each read their shard of recorded Breakout
    rows once into memory, train on random windows, and a crashed worker group reloads its shards
    and continues from the checkpoint: the latest one the controller had registered when the
    worker died, not from scratch. The checks' best EMA weights (export_best) are kept in the
    checkpoints and come through the restart, and every step's metrics reach MLflow."""
    from workers.data import frame_dataset

    ds = frame_dataset(tiny_dataset.root, "Breakout", "train")
    cfg = _cfg(tmp_path, steps=12, fail_at_step=7, max_failures=1, data_loader="device", val_every=3,
               val_windows=3)
    frames = windows_ds.select_columns(["frames"])
    result, run_id = _fit(cfg, ds, side={"val": frames, "select": frames.limit(5)})
    lines = [json.loads(x) for x in metrics_path(tmp_path, "vae").read_text().splitlines()]
    loads = [e for e in lines if e.get("event") == "frame_store"]
    # one load per worker per attempt (rank 0 logs: one line per attempt)
    assert len(loads) == 2, loads
    total = sum(1 for _ in frame_dataset(tiny_dataset.root, "Breakout", "train").iter_rows())
    assert 0 < loads[0]["rows"] < total  # a shard, not the whole split
    rows = [r for r in read_metrics(metrics_path(tmp_path, "vae")) if "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = np.array([r["train/loss"] for r in rows])
    assert losses[-3:].mean() < 0.8 * losses[:3].mean(), losses
    # The crash happened (marker) and the group restarted from step 6's checkpoint, or 4's if the
    # step-6 report was still in flight.
    assert (tmp_path / "vae.crashed").read_text() == "7"
    starts = _starts(cfg)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (4, 6), starts
    assert [e["world_size"] for e in lines if e.get("event") == "start"] == [2, 2]
    assert [e["gpu_ids"] for e in lines if e.get("event") == "start"] == [[], []]  # CPU workers: none assigned
    checks = [r for r in rows if "val/mse_train" in r]
    assert [r["step"] for r in checks][-3:] == [6, 9, 12] and all(r["val/mse_train"] > 0 for r in checks)
    state = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=False)
    assert state["best_step"] in {r["step"] for r in checks}
    # The same windows before and after the restart: the kept score stands, and a check replaces
    # the kept weights only when lower.
    assert state["best_mse"] == pytest.approx(min(r["val/mse_train"] for r in checks), rel=1e-6)
    best_lines = [r["step"] for r in checks if "val/best_step" in r]
    assert best_lines and best_lines[-1] == state["best_step"]
    assert set(state["best_ema"]) == set(state["ema"])
    assert state["step"] == 12 and set(state) >= {"model", "ema", "optimizer", "scheduler"}
    assert json.loads((Path(result.checkpoint.path) / "config.json").read_text())["steps"] == 12
    # Metrics reached MLflow from the driver for every step; only the steps run again after the
    # restart (after its checkpoint, up to the crash at 7) appear twice.
    hist = sorted(m.step for m in MlflowClient(local_tracking_uri(tmp_path)).get_metric_history(run_id, "train/loss"))
    assert sorted(set(hist)) == list(range(1, 13))
    twice = {s for s in hist if hist.count(s) > 1}
    assert twice <= set(range(starts[1] + 1, 8)) and all(hist.count(s) <= 2 for s in hist), hist


def test_best_weights_keep_a_copy_of_the_lowest_check():
    """BestWeights.offer keeps a copy (not a view) of the weights of the lowest MSE offered; a NaN
    or a higher MSE leaves it; its checkpoint entries restore it."""
    from workers.train_vae import BestWeights

    model = torch.nn.Linear(3, 2)
    best = BestWeights()
    assert best.state() == {}
    for step, mse in [(1, 3.0), (2, 1.0), (3, 2.0), (4, float("nan"))]:
        with torch.no_grad():
            model.weight.fill_(step)
        assert best.offer(step, mse, model) == (step in (1, 2))
    assert (best.step, best.mse) == (2, 1.0)
    assert bool((best.weights["weight"] == 2).all()) and bool((model.weight == 4).all())
    again = BestWeights(best.state())
    assert (again.step, again.mse) == (2, 1.0) and again.weights["weight"] is best.weights["weight"]
    assert not again.offer(5, 1.0, model)  # a tie keeps the earlier weights


def test_optimizer_step_leaves_the_grad_norm_on_the_device_and_stops_on_nan(tmp_path):
    """The clipped step hands back the gradient norm as a tensor (read only when logging), equal to
    the norm before clipping; a NaN loss updates nothing and writes the non-finite event."""
    from workers.train_common import EMA, JsonlLog, TrainSettings, make_optimizer, make_scheduler, optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = TrainSettings(run_dir=str(tmp_path), grad_clip=0.5, lr=0.1, warmup_steps=0)
    opt, ema, log = make_optimizer(model, cfg), EMA(model, 0.9), JsonlLog(tmp_path / "m.jsonl", active=True)
    sched = make_scheduler(opt, cfg)
    x = torch.randn(8, 4)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    ref(x).pow(2).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    ok, norm = optimizer_step(model(x).pow(2).sum(), model, opt, sched, ema, cfg, 0, log)
    assert ok and isinstance(norm, torch.Tensor) and norm.ndim == 0
    torch.testing.assert_close(norm, expected)
    assert not torch.equal(model.weight, ref.weight)  # the step ran

    before = [p.detach().clone() for p in model.parameters()]
    ok, norm = optimizer_step(model(x).sum() * float("nan"), model, opt, sched, ema, cfg, 1, log)
    assert not ok and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (event,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert event["event"] == "nonfinite" and event["step"] == 1
    assert skip_counter_of(opt) is None  # CPU AdamW is not fused: the host check above, each step


def skip_counter_of(opt):
    from workers.train_common import skip_counter

    return skip_counter(opt, torch.device("cpu"))


def test_fused_optimizer_skips_a_nonfinite_step_on_the_device_and_stops_at_the_log_step(tmp_path, monkeypatch):
    """With a fused AdamW (the GPU's), a non-finite step is found without reading the device: the
    optimiser leaves parameters, moments and step count as they were, a device counter counts the
    step, and the log step's read of that counter writes the non-finite event and stops."""
    from workers.train_common import EMA, JsonlLog, TrainSettings, make_scheduler, optimizer_step, stop_if_skipped

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = TrainSettings(run_dir=str(tmp_path), grad_clip=0.5, lr=0.1, warmup_steps=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)  # the CPU has a fused kernel too
    ema, log, sched = EMA(model, 0.9), JsonlLog(tmp_path / "m.jsonl", active=True), make_scheduler(opt, cfg)
    skipped = skip_counter_of(opt)
    assert skipped is not None and skipped.item() == 0
    x = torch.randn(8, 4)
    ok, _ = optimizer_step(model(x).pow(2).sum(), model, opt, sched, ema, cfg, 0, log, skipped)
    assert ok and skipped.item() == 0 and int(opt.state[model.weight]["step"]) == 1
    assert not stop_if_skipped(skipped, 0, log)

    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    loss = model(x).sum() * float("nan")

    def host_read(*args, **kwargs):
        raise AssertionError("the fused path read a device value on the host")

    with monkeypatch.context() as m:  # any read of a tensor's value on the host fails
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            m.setattr(torch.Tensor, name, host_read)
        ok, norm = optimizer_step(loss, model, opt, sched, ema, cfg, 1, log, skipped)
    assert ok and not torch.isfinite(norm)  # the caller goes on; the counter holds the news
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(moments, model.parameters()))
    assert int(opt.state[model.weight]["step"]) == 1 and getattr(opt, "found_inf", None) is None
    assert skipped.item() == 1 and not (tmp_path / "m.jsonl").exists()
    assert stop_if_skipped(skipped, 50, log)
    (event,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert event["event"] == "nonfinite" and event["step"] == 50 and event["skipped_steps"] == 1
    # a later finite step updates again
    ok, _ = optimizer_step(model(x).pow(2).sum(), model, opt, sched, ema, cfg, 2, log, skipped)
    assert ok and not torch.equal(before[0], model.weight) and skipped.item() == 1


class _Interrupted(Exception):
    pass


class _LocalSession:
    """Ray Train's part of the loop in the test process: CPU, no DDP, checkpoints in a folder;
    `stop_after`: the run dies right after reporting that step's checkpoint."""

    def __init__(self, root: Path, shard, stop_after: int | None = None):
        self.root, self.shard, self.stop_after = root, shard, stop_after
        self.reports: list[dict] = []

    def device(self):
        return torch.device("cpu")

    def dataset_shard(self, name):
        return self.shard if name == "train" else None

    def prepare_model(self, model):
        return model

    def latest(self) -> Path | None:
        return max(self.root.glob("ckpt*"), default=None)

    def checkpoint_state(self, map_location):
        latest = self.latest()
        return None if latest is None else torch.load(latest / "state.pt", map_location=map_location, weights_only=False)

    def report(self, metrics, checkpoint_fn=None):
        self.reports.append(metrics)
        if checkpoint_fn is not None:
            d = self.root / f"ckpt{metrics['step']:06d}"
            d.mkdir(parents=True)
            checkpoint_fn(d)
        if metrics["step"] == self.stop_after:
            raise _Interrupted


class _Shard:
    """A "stream" shard of two batches an epoch, in a fixed order; records the shuffle seed each
    epoch asked for."""

    def __init__(self, frames: torch.Tensor):
        self.frames = frames
        self.seeds: list[int] = []

    def iter_torch_batches(self, batch_size: int, drop_last: bool, local_shuffle_buffer_size: int = 0,
                           local_shuffle_seed: int | None = None):
        self.seeds.append(local_shuffle_seed)
        for i in range(0, len(self.frames) - batch_size + 1, batch_size):
            yield {"frames": self.frames[i:i + batch_size]}


def _regression_component(cfg):
    from workers.train_loop import TrainComponent

    class Regression(TrainComponent):
        """Predicts a window's second frame from its first; no draw from the global RNG after the
        model's init, so two runs of it differ only by what the loop does."""

        clip_length = 2

        def build(self, device):
            return torch.nn.Linear(3, 3).to(device)

        def start(self, loop):
            self.batches = loop.restored.get("batches", 0)

        def batch(self, step, windows):
            self.batches += 1
            return windows(step, 2)[0]  # (B, 2, 3)

        def loss_and_logs(self, model, x):
            err = model(x[:, 0]) - x[:, 1]
            return err.pow(2).mean(), {"train/abs": err.abs().mean().detach()}

        def checkpoint_extra(self):
            return {"batches": self.batches}

    return Regression(cfg)


def test_loop_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    """An attempt that dies after its step-4 checkpoint, then resumes, ends bit for bit where an
    uninterrupted run does: weights, EMA, AdamW moments and the still-warming learning rate continue
    from the checkpoint, the component's own checkpoint entries come back, and every step is logged
    once with the component's scalars beside the loss."""
    from workers.train_common import TrainSettings
    from workers.train_loop import train

    frames = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0))

    def run(name, session):
        cfg = TrainSettings(run_dir=str(tmp_path), name=name, steps=6, batch_size=4, lr=0.05, warmup_steps=10,
                            ema_decay=0.9, log_every=1, checkpoint_every=2, data_loader="stream")
        component = _regression_component(cfg)
        train(component, session)
        return component

    whole = _LocalSession(tmp_path / "whole", _Shard(frames))
    run("whole", whole)
    cut = _LocalSession(tmp_path / "cut", _Shard(frames), stop_after=4)
    with pytest.raises(_Interrupted):
        run("cut", cut)
    cut.stop_after = None
    resumed = run("cut", cut)

    assert [r["step"] for r in cut.reports] == [2, 4, 6] == [r["step"] for r in whole.reports]
    assert _starts(TrainSettings(run_dir=str(tmp_path), name="cut")) == [0, 4]
    rows = [r for r in read_metrics(metrics_path(tmp_path, "cut")) if "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all("train/abs" in r for r in rows)
    a, b = (torch.load(s.latest() / "state.pt", weights_only=False) for s in (whole, cut))
    assert a["step"] == b["step"] == 6 and a["batches"] == b["batches"] == resumed.batches == 6
    for key in ("model", "ema"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    torch.testing.assert_close(b["optimizer"], a["optimizer"], rtol=0, atol=0)
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 6
    # every epoch of the stream is shuffled by a seed of its own, and the resumed attempt's differ
    # from the first attempt's (it does not replay the batches it began with)
    assert len(set(whole.shard.seeds)) == len(whole.shard.seeds) >= 3 and None not in whole.shard.seeds
    assert cut.shard.seeds[:2] == whole.shard.seeds[:2] and not set(cut.shard.seeds[2:]) & set(whole.shard.seeds)
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 7 / 10)  # warmup still running


def test_stream_batches_are_shuffled_within_each_epoch_by_their_seed(ray_local):
    """The "stream" loader on a real Ray Dataset that arrives in order (as windows arrive episode by
    episode): a batch is not a run of neighbours, each epoch holds every row once, epochs differ,
    and the same seed gives the same order."""
    import ray

    from workers.train_common import infinite_batches

    ds = ray.data.range(256, override_num_blocks=4)

    def epochs(seed, n=2):
        it = infinite_batches(ds, 32, ("id",), shuffle_seed=seed)
        return [torch.cat([next(it)["id"] for _ in range(8)]).tolist() for _ in range(n)]

    first, second = epochs(7)
    assert sorted(first) == sorted(second) == list(range(256))
    assert first != list(range(256)) and first != second
    assert epochs(7, 1)[0] == first and epochs(8, 1)[0] != first
    unshuffled = next(infinite_batches(ds, 32, ("id",)))["id"].tolist()
    assert unshuffled == list(range(32))  # what the loader read before: neighbours
