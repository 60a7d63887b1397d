"""Markdown tables of finished pipeline runs, as docs/results.md shows them: per run (one game
each, as `scripts/gpu_run.sh` makes them) its stages, Table 2 beside the paper and copy-last, every
evaluation of the same held-out windows (snapshots, sampler steps, variants), and the windows
whose error dwarfs the rest.

    python scripts/run_summary.py /tmp/gpurun                # a gpu_run.sh directory: its runs
    python scripts/run_summary.py runs/smoke --gpu-util util.csv

A run is a `run_all.py --out` directory (it has `stages/`). GPU busy is the mean NVML utilisation
of the GPUs in use (mean above 10 %) over a training stage's logged steps, from the
`nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader` log
that `gpu_run.sh` keeps as `gpu_util.csv`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table  # noqa: E402


def _md(df: pd.DataFrame, index: str | None = None) -> str:
    """A frame as a Markdown table; `index` names the index column (left out when None)."""
    if index is not None:
        df = df.rename_axis(index).reset_index()
    return markdown_table(df.to_dict(orient="records"), [str(c) for c in df.columns])


def find_runs(paths: list[str]) -> list[Path]:
    """Each path that is a run, else the runs directly under it, sorted by name."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "stages").is_dir():
            runs.append(p)
        else:
            runs += sorted(d for d in p.iterdir() if (d / "stages").is_dir()) if p.is_dir() else []
    if not runs:
        raise SystemExit(f"no run directories (with stages/) in {paths}")
    return runs


def _stage(run: Path, name: str) -> dict:
    f = run / "stages" / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_gpu_util(path: str | Path) -> pd.DataFrame | None:
    """The nvidia-smi CSV log as (t: epoch seconds, idx, util %); None when it is empty (no GPU)."""
    if Path(path).stat().st_size == 0:
        return None
    u = pd.read_csv(path, header=None, names=["ts", "idx", "util", "mem"], skipinitialspace=True)
    u["t"] = pd.to_datetime(u.ts, format="%Y/%m/%d %H:%M:%S.%f").map(lambda x: x.timestamp()).astype(float)
    u["util"] = u.util.astype(str).str.replace("%", "").astype(float)
    return u[["t", "idx", "util"]]


def _busy(util: pd.DataFrame | None, t0: float, t1: float, gpus: list[int] | None = None) -> str:
    """Mean utilisation from t0 to t1 of the job's own GPUs (`gpus`, the ids its start event
    logged); without them, of every GPU busier than 10 % then, which on a machine running several
    jobs at once mixes theirs in."""
    if util is None:
        return "n/a"
    per_gpu = util[(util.t >= t0) & (util.t <= t1)].groupby("idx").util.mean()
    used = per_gpu[per_gpu.index.isin(gpus)] if gpus else per_gpu[per_gpu > 10]
    return f"{used.mean():.0f} %" if len(used) else "n/a"


def training_summary(path: Path, key: str, util: pd.DataFrame | None) -> str:
    """`steps (rate/s), <key> <mean of the last 10 logged>, GPU busy` of one training metrics log."""
    rows = [r for r in _metrics(path) if key in r]
    if not rows:
        return "—"
    rate = float(np.median([r["train/steps_per_s"] for r in rows[len(rows) // 2:]]))
    last = float(np.mean([r[key] for r in rows[-10:]]))
    start = _event(path, "start") or {}
    gpus = start.get("gpu_ids") if start.get("world_size", 1) == 1 else None  # rank 0's alone otherwise
    return (f"{rows[-1]['step']:,} steps ({rate:.1f}/s), {key.split('/')[-1]} {last:.4f}, "
            f"GPU busy {_busy(util, rows[0]['time'], rows[-1]['time'], gpus)}")


def _event(path: Path, name: str) -> dict | None:
    """The first `{"event": name, ...}` line of a training job's metrics JSONL, if any."""
    return next((r for r in _metrics(path) if r.get("event") == name), None)


def stage_table(runs: list[Path], util: pd.DataFrame | None) -> pd.DataFrame:
    cols: dict[str, dict[str, str]] = {}
    for run in runs:
        collect, vae, dit, ev = (_stage(run, s) for s in ("collect", "vae", "dit", "evaluate"))
        games = collect.get("games", {})
        game = next(iter(games), run.name)
        g = games.get(game, {})
        col = {"collect (wall)": f"{collect.get('wall_s', float('nan')):.0f} s"}
        if g:
            steady = g.get("steady_steps_per_s")
            col["recording steps/s (all / steady)"] = (f"{g['steps_per_s']:,.0f} / "
                                                       + (f"{steady:,.0f}" if steady else "n/a"))
            col["bytes/frame"] = f"{g['bytes_per_frame']:.0f}"
            split = g.get("episodes_per_split", {})
            col["rows; episodes train / test"] = f"{g['rows']:,}; {split.get('train', 0)} / {split.get('test', 0)}"
        vae_dir = Path(vae.get("vae_path", run / "models" / "vae"))
        if vae and vae_dir.parent.parent.name != run.name:  # a variant that reuses its pipeline's VAE
            col["VAE"] = f"reused: {vae_dir.parent.parent.name}'s"
        else:
            col["VAE"] = (f"{vae.get('wall_s', float('nan')):.0f} s: "
                          + training_summary(run / "vae.metrics.jsonl", "train/recon", util)) if vae else "—"
        val = [r for r in _metrics(run / "vae.metrics.jsonl") if "val/mse" in r] if vae else []
        if val:  # the VAE job's held-out check (TrainVAEConfig.val_every), last and lowest
            last, best = val[-1], min(val, key=lambda r: r["val/mse"])
            col["VAE held-out MSE: EMA / raw / raw as trained (step)"] = (
                f"{last['val/mse']:.2f} / {last['val/mse_raw']:.2f} / {last['val/recon_train_way']:.2f} "
                f"({last['step']:,}); lowest EMA {best['val/mse']:.2f} ({best['step']:,})")
            chosen = [r for r in val if "val/best_step" in r]
            if chosen:  # TrainVAEConfig.export_best: the EMA of the lowest check on training windows
                c = chosen[-1]
                col["VAE exported: step; MSE training / held-out windows"] = (
                    f"{c['step']:,}; {c['val/mse_train']:.2f} / {c['val/mse']:.2f}")
        name = Path(dit["model_path"]).name if dit.get("model_path") else f"dit-{game}"
        col["DiT"] = (f"{dit.get('wall_s', float('nan')):.0f} s: "
                      + training_summary(run / f"{name}.metrics.jsonl", "train/loss", util)) if dit else "—"
        store = _event(run / f"{name}.metrics.jsonl", "frame_store")
        if store:  # what the DiT trained on: all the training episodes, or its `train_episodes` share
            col["DiT trained on: rows; episodes"] = f"{store['rows']:,}; {store['episodes']}"
        col["evaluate (wall)"] = f"{ev['wall_s']:.0f} s" if ev else "—"
        cols[run.name] = col
    return pd.DataFrame(cols).fillna("—")


def _main_eval(run: Path) -> Path | None:
    ev = _stage(run, "evaluate")
    d = Path(ev["eval_dir"]) if ev.get("eval_dir") else None
    if d is not None and not d.exists():  # the run directory was moved: the same name under this run
        d = run / "eval" / d.name
    return d if d is not None and d.exists() else None


def table2(run: Path) -> pd.DataFrame:
    """The pipeline's own evaluation at T = 1, 2, 4 beside the paper and copy-last (PSNR of the
    mean MSE, the paper's convention)."""
    d = _main_eval(run)
    if d is None or not (d / "vs_paper.csv").exists():
        return pd.DataFrame()
    vs = pd.read_csv(d / "vs_paper.csv")
    gl = pd.read_csv(d / "generation_length.csv")
    copy_lpips = gl[gl.method == "copy_last"].set_index("generation_length").lpips
    out = pd.DataFrame({
        "game": vs.game, "T": vs.generation_length,
        "MSE ours / paper / copy-last": [f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in
                                         zip(vs.mse, vs.paper_mse, vs.copy_last_mse)],
        "PSNR ours / paper / copy-last": [f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in
                                          zip(vs.psnr_of_mean_mse, vs.paper_psnr, vs.copy_last_psnr_of_mean_mse)],
        "dB over copy-last": [f"{v:.2f}" for v in vs.db_over_copy_last],
        "per-window PSNR": [f"{v:.2f}" for v in vs.psnr],
        "LPIPS ours / paper / copy-last": [f"{a:.3f} / {b:.3f} / {copy_lpips.get(t, math.nan):.3f}"
                                           for a, b, t in zip(vs.lpips, vs.paper_lpips, vs.generation_length)],
        "beats paper (MSE, PSNR)": [f"{'yes' if a < b else 'no'}, {'yes' if c > d_ else 'no'}" for a, b, c, d_ in
                                    zip(vs.mse, vs.paper_mse, vs.psnr_of_mean_mse, vs.paper_psnr)],
        "windows": vs.num_windows,
    })
    return out


def _scores(d: Path | None) -> dict[str, np.ndarray] | None:
    """An evaluation directory's per-window scores (`<game>_scores.npz`), or None."""
    files = sorted(d.glob("*_scores.npz")) if d is not None and d.exists() else []
    if not files:
        return None
    with np.load(files[0], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _window_keys(z: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    return [(str(e), int(s)) for e, s in zip(z["episode_id"], z["start_step"])]


def _model_mse(z: dict[str, np.ndarray], T: int) -> np.ndarray:
    """Per-window model MSE at generation length T: its own rollout where it has one (a length the
    model was trained to generate), else the first T frames of the longest rollout."""
    key = f"model_T{T}__mse"
    return z[key].mean(1) if key in z else z["model__mse"][:, :T].mean(1)


def outlier_windows(run: Path, horizon: int = 4, factor: float = 20.0) -> set[tuple[str, int]]:
    """(episode_id, start_step) of the windows whose model MSE at `horizon` in the pipeline's own
    evaluation exceeds `factor` x the median (the windows `outliers` counts)."""
    z = _scores(_main_eval(run))
    if z is None or "episode_id" not in z:
        return set()
    m = _model_mse(z, horizon)
    return {k for k, big in zip(_window_keys(z), m > factor * np.median(m)) if big}


def evaluations(run: Path, horizon: int = 4, lengths: tuple[int, ...] = (1, 2, 4)) -> pd.DataFrame:
    """Every evaluation under the run at generation length `horizon`: the model's row (MSE, PSNR
    of the mean MSE, LPIPS, Euler steps) and, once, copy-last's and the VAE's reconstruction. When
    the pipeline's own evaluation has outlier windows (`outlier_windows`), each row also gets its
    mean MSE at `lengths` without those same windows, matched by episode and start step, so that
    the evaluations compare on the windows where the error is not one event's; and its median
    window MSE at `lengths`, which one window of its own (a generated flash, say) cannot move."""
    drop = outlier_windows(run)
    Ts = " / ".join(map(str, lengths))

    def robust(z: dict[str, np.ndarray] | None, mse) -> dict[str, str]:
        """The mean without the pipeline's outlier windows (a column only when there are some) and
        the median, of per-window MSE `mse(z, T)` at each length."""
        cols = {}
        if drop:
            keep = np.array([k not in drop for k in _window_keys(z)]) if z is not None and "episode_id" in z else None
            cols[f"MSE T = {Ts} without the {len(drop)} outliers"] = (
                "—" if keep is None else " / ".join(f"{mse(z, T)[keep].mean():.1f}" for T in lengths))
        cols[f"median MSE T = {Ts}"] = "—" if z is None else " / ".join(f"{np.median(mse(z, T)):.1f}" for T in lengths)
        return cols

    rows = []
    for d in sorted((run / "eval").glob("*/generation_length.csv")):
        gl = pd.read_csv(d)
        at = gl[gl.generation_length == horizon]
        model = at[at.method == "model"]
        if model.empty:
            continue
        m = model.iloc[0]
        rows.append({"evaluation": d.parent.name, "sample_steps": int(m.get("sample_steps", 0)),
                     "MSE": f"{m.mse:.2f}", "PSNR": f"{m.psnr_of_mean_mse:.2f}", "LPIPS": f"{m.lpips:.3f}",
                     "windows": int(m.num_windows), **robust(_scores(d.parent), _model_mse)})
    main = _main_eval(run)
    if main is not None:
        gl = pd.read_csv(main / "generation_length.csv")
        z = _scores(main)
        for method in ("copy_last", "vae_recon"):
            r = gl[(gl.generation_length == horizon) & (gl.method == method)]
            if not r.empty:
                r = r.iloc[0]
                mse = (lambda z_, T, m=method: z_[f"{m}__mse"][:, :T].mean(1))
                has = z is not None and f"{method}__mse" in z
                rows.append({"evaluation": method, "sample_steps": "—", "MSE": f"{r.mse:.2f}",
                             "PSNR": f"{r.psnr_of_mean_mse:.2f}", "LPIPS": f"{r.lpips:.3f}",
                             "windows": int(r.num_windows), **robust(z if has else None, mse)})
    return pd.DataFrame(rows)


def outliers(run: Path, horizon: int = 4, factor: float = 20.0) -> dict | None:
    """Windows whose model MSE at `horizon` exceeds `factor` x the median: how many, their share of
    the mean, and the model's, copy-last's and the VAE's mean MSE without them."""
    z = _scores(_main_eval(run))
    if z is None or f"model_T{horizon}__mse" not in z:
        return None
    m = _model_mse(z, horizon)
    big = m > factor * np.median(m)
    keep = ~big
    return {"windows": int(len(m)), "outliers": int(big.sum()),
            "share_of_mean": float(m[big].sum() / m.sum()) if m.sum() > 0 else 0.0,
            "model_mse_without": float(m[keep].mean()),
            "copy_last_mse_without": float(z["copy_last__mse"][:, :horizon].mean(1)[keep].mean()),
            "vae_recon_mse_without": float(z["vae_recon__mse"][:, :horizon].mean(1)[keep].mean())}


def vae_floor_table(df: pd.DataFrame) -> pd.DataFrame:
    """vae_floor.py's rows as one row per way of running the VAE, with the training and held-out
    MSE (0-255) side by side and their ratio: a ratio near 1 on every row says the held-out floor
    is the VAE's, a row far from the others says which path differs."""
    key = ["weights", "precision", "latent"]
    wide = df.pivot_table(index=key, columns="split", values="mse_0_255", sort=False)
    if not {"train", "test"} <= set(wide.columns):
        raise ValueError(f"vae_floor table: expected train and test rows, got splits {sorted(wide.columns)}")
    return pd.DataFrame({"MSE train": wide["train"].map("{:.2f}".format),
                         "MSE held-out": wide["test"].map("{:.2f}".format),
                         "held-out / train": (wide["test"] / wide["train"]).map("{:.2f}".format)}).reset_index()


def summarise(paths: list[str], gpu_util: str | None = None) -> str:
    runs = find_runs(paths)
    if gpu_util is None:  # gpu_run.sh keeps it beside the runs
        near = [Path(p) / "gpu_util.csv" for p in paths] + [r.parent / "gpu_util.csv" for r in runs]
        gpu_util = next((str(f) for f in near if f.exists()), None)
    util = read_gpu_util(gpu_util) if gpu_util else None
    parts = ["### Stages", "", _md(stage_table(runs, util), "stage"), ""]
    t2 = [table2(r) for r in runs]
    t2 = [t for t in t2 if not t.empty]
    if t2:
        parts += ["### Table 2 (PSNR of the mean MSE)", "", _md(pd.concat(t2)), ""]
    for r in runs:
        ev = evaluations(r)
        if not ev.empty:
            parts += [f"### {r.name}: every evaluation of its windows, T = 4", "", _md(ev), ""]
        floor = r / "vae_floor.csv"  # scripts/vae_floor.py, run by gpu_run.sh
        if floor.exists():
            parts += [f"### {r.name}: the VAE's reconstruction MSE by split and path (vae_floor.py)", "",
                      _md(vae_floor_table(pd.read_csv(floor))), ""]
        o = outliers(r)
        if o and o["outliers"]:
            parts += [f"{r.name}: {o['outliers']} of {o['windows']} windows have more than 20x the median T = 4 "
                      f"MSE: {100 * o['share_of_mean']:.0f} % of the mean. Without them: model "
                      f"{o['model_mse_without']:.1f}, copy-last {o['copy_last_mse_without']:.1f}, VAE "
                      f"reconstruction {o['vae_recon_mse_without']:.1f}.", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run directories, or directories holding them")
    p.add_argument("--gpu-util", default=None, help="nvidia-smi CSV log (default: gpu_util.csv beside the runs)")
    a = p.parse_args()
    sys.stdout.write(summarise(a.paths, a.gpu_util) + "\n")
