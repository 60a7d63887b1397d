"""The results tables, built from the recorded evaluations of every run of the current preset version.

    python -m pipeline.results tables                      # docs/results/runs/* -> docs/results/current/
    python -m pipeline.results tables --runs R --out O --preset gpu
    python -m pipeline.results tables --run docs/results/runs/<run-id> ...   # only these runs

A run of `pipeline/run_all.py` records its evaluation in `<out>/results/<run-id>/`: `run.json` (preset,
preset version, game, training seed, split, the resolved settings, the command, commit, GPU, date
and stage wall times) and `<game>_scores.npz` (per-window, per-frame scores with the window keys
episode_id and start_step). Committed under `docs/results/runs/<run-id>/`, such records accumulate
across runs and machines; `tables` pools, per game, every run of the preset's *current* version on
the test split (one training seed each) into `table2.csv`: each mean over seeds with a 95 % bootstrap
interval over test episodes (`pipeline/stats.py`), the seed-to-seed std, the dB over copy-last with
its paired interval, and the paper's cells labelled as measured on other data; `table2.meta.json`
lists the pooled runs (commit, command, GPU, date) and those left out, and why. Runs of other
versions are listed, never pooled; naming one explicitly with `--run` is an error.

    python -m pipeline.results ablations                   # sweep trials -> table3.csv, table4.csv
    python -m pipeline.results ablations --sweep-version V [--run docs/results/runs/<trial-id> ...]

A sweep trial scored on the test split (`pipeline/sweep.py`) records itself the same way, with
`kind` "sweep_trial", its variant (action_mode, action_encoder), its seed and its sweep version.
`ablations` pools, per game, the trials of the preset's current sweep versions that vary
action_mode (Table 3, encoder at the reference's "embedding") or action_encoder (Table 4, mode at
the reference's "future") into one row per variant and T, with the copy-last rows, the
inverse-dynamics accuracy on the generated frames, and each variant's MSE difference from the
reference (future + embedding), paired on the same windows and seeds, with its 95 % episode
interval; rows of fewer than 3 seeds are shown but not reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/results.py`): run again as `python -m pipeline.results`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.results", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np
import pandas as pd

GAMES_ORDER = ("Breakout", "Pong", "DemonAttack")
TRIAL_KIND = "sweep_trial"
"""run.json `kind` of a sweep trial's record (`pipeline/sweep.py`); a job's evaluation records have none."""
TABLE2_COLUMNS = ["game", "T", "method", "mse", "mse_ci_low", "mse_ci_high", "mse_std_seeds", "mse_seed_ci_low",
                  "mse_seed_ci_high", "psnr_of_mean_mse",
                  "db_over_copy_last", "db_ci_low", "db_ci_high", "lpips", "lpips_ci_low", "lpips_ci_high", "seeds",
                  "windows", "episodes"]
TABLE2_T = (1, 2, 4)
MIN_SEEDS = 3
"""Training seeds a row needs to be a reported result (column `reported`)."""
PAPER_METHOD = "paper (other data)"
TEST_SETS = ("test", "other_policy")
"""run.json `test_set` of a record: "test" (the test split of the run's own collection; a record without
the key) or "other_policy" (the test split of another policy's collection under its own data root, e.g.
the collect stage's random policy with `CollectConfig.random_repeat`, scored by a model trained on the
run's collection). Only "test" records pool into Table 2 and the imagination table; action_fidelity.csv
has one row set per test set."""
DEFAULT_RUNS = Path("docs/results/runs")
DEFAULT_OUT = Path("docs/results/current")


def _game_order(game: str) -> tuple[int, str]:
    """The paper's order of the games, others after them by name."""
    return (GAMES_ORDER.index(game) if game in GAMES_ORDER else len(GAMES_ORDER), game)


class ResultsError(ValueError):
    """A run record or request that the tables cannot use, named."""


# -- recording one run ---------------------------------------------------------------------------
def commit_hash() -> str:
    """HEAD of this checkout, with "-dirty" when tracked files differ from it; else $AWM_COMMIT
    (a `ray job submit` upload has no .git), else "unknown"."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("AWM_COMMIT", "unknown")


def gpu_names() -> str:
    """The machine's GPUs as nvidia-smi names them ("2x NVIDIA H100 80GB HBM3"), or "none (CPU)"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if out.returncode == 0 and names:
            return f"{len(names)}x {names[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return "none (CPU)"


def record_run(results_dir: str | Path, scores_file: str | Path, *, preset: str, version: str, game: str,
               seed: int, split: str, settings: dict[str, Any], stage_walls: dict[str, Any],
               command: str, extra: dict[str, Any] | None = None, tag: str = "") -> Path:
    """Write `<results_dir>/<run-id>/` (run.json and the scores file): what `tables` pools. `extra`
    adds keys to run.json (a sweep trial's kind, variant and sweep version); `tag` goes into the
    run id after the game."""
    scores_file = Path(scores_file)
    if not scores_file.is_file():
        raise FileNotFoundError(f"record_run: no scores file at {scores_file}")
    now = dt.datetime.now(dt.timezone.utc)
    run_id = f"{preset}-{version}-{game}{'-' + tag if tag else ''}-s{seed}-{now:%Y%m%dT%H%M%S}-{os.urandom(2).hex()}"
    meta = {"run_id": run_id, "preset": preset, "preset_version": version, "game": game, "seed": seed,
            "split": split, "date": now.isoformat(timespec="microseconds"), "commit": commit_hash(), "gpu": gpu_names(),
            "command": command, "stage_wall_s": stage_walls, "settings": settings}
    clash = sorted(set(extra or {}) & set(meta))
    if clash:
        raise ValueError(f"record_run: extra keys {clash} would replace the record's own")
    meta.update(extra or {})
    out = Path(results_dir) / run_id
    out.mkdir(parents=True)
    shutil.copy2(scores_file, out / f"{game}_scores.npz")
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=list))
    os.replace(tmp, out / "run.json")
    return out


# -- reading records -------------------------------------------------------------------------------
def load_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(run.json, scores with '/' keys) of a recorded run; a record without window keys is refused."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ResultsError(f"{run_dir}: no run.json (not a recorded run)")
    meta = json.loads(meta_path.read_text())
    for key in ("preset", "preset_version", "game", "seed", "split"):
        if key not in meta:
            raise ResultsError(f"{meta_path}: no {key!r}")
    scores_path = run_dir / f"{meta['game']}_scores.npz"
    if not scores_path.is_file():
        raise ResultsError(f"{run_dir}: no scores file {scores_path.name}")
    with np.load(scores_path, allow_pickle=False) as z:
        scores = {k.replace("__", "/"): z[k] for k in z.files}
    if "episode_id" not in scores or "start_step" not in scores:
        raise ResultsError(f"{scores_path}: no window keys (episode_id, start_step): scores cannot be paired "
                           f"or resampled by episode")
    meta["record_dir"] = str(run_dir)  # where the run's other records (imagine_returns.npz) lie; not stored
    return meta, scores


def test_set_of(meta: dict[str, Any]) -> str:
    """A record's test set (`TEST_SETS`): its run.json `test_set`, "test" where it has none."""
    test_set = meta.get("test_set", "test")
    if test_set not in TEST_SETS:
        raise ResultsError(f"run {meta.get('run_id')!r}: test_set {test_set!r}; expected one of {TEST_SETS}")
    return test_set


def current_version(preset: str) -> str:
    """The version of a preset as the code defines it now."""
    from pipeline.presets import PRESETS, preset_version

    if preset not in PRESETS:
        raise ResultsError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    return preset_version(PRESETS[preset]())


def select_runs(run_dirs: list[Path], preset: str, version: str, explicit: bool
                ) -> tuple[list[tuple[dict, dict]], list[dict[str, str]]]:
    """The runs to pool (preset and version match, test split) and the others with the reason. Named
    explicitly, a run that does not match is an error."""
    pooled, left = [], []
    for d in run_dirs:
        meta, scores = load_run(d)
        why = None
        if meta.get("kind") == TRIAL_KIND:
            why = "a sweep trial (Tables 3 and 4: python -m pipeline.results ablations)"
        elif meta["preset"] != preset:
            why = f"preset {meta['preset']!r}, not {preset!r}"
        elif meta["preset_version"] != version:
            why = f"preset version {meta['preset_version']}, not the current {version}"
        elif meta["split"] != "test":
            why = f"scored on the {meta['split']!r} split, not test"
        if why and explicit:
            raise ResultsError(f"{d}: {why}: only runs of the current version on the test split pool")
        if why:
            left.append({"run_id": meta.get("run_id", d.name), "why": why})
        else:
            pooled.append((meta, scores))
    # one record per (game, seed, test set): a re-evaluated seed counts once, by its newest record
    newest: dict[tuple[str, int, str], tuple[dict, dict]] = {}
    for meta, scores in sorted(pooled, key=lambda ms: ms[0].get("date", "")):
        key = (meta["game"], int(meta["seed"]), test_set_of(meta))
        if key in newest:
            old = newest[key][0]
            on = "" if key[2] == "test" else f" on {key[2]}"
            left.append({"run_id": old.get("run_id"), "why": f"an older record of {key[0]} seed {key[1]}{on}"})
        newest[key] = (meta, scores)
    return list(newest.values()), left


# -- Table 2 ---------------------------------------------------------------------------------------
def table2(pooled: list[tuple[dict, dict]], n_boot: int = 2000) -> pd.DataFrame:
    """Per game and T: model, copy-last and the VAE's floor pooled over seeds, and the paper's cells."""
    from pipeline.paper import PAPER
    from pipeline.stats import pooled_rows

    by_game: dict[str, list[dict]] = {}
    for meta, scores in pooled:
        by_game.setdefault(meta["game"], []).append(scores)
    rows = []
    for game in sorted(by_game, key=_game_order):
        runs = by_game[game]
        for r in pooled_rows(runs, TABLE2_T, n_boot=n_boot):
            rows.append({"game": game, **r})
        for T in TABLE2_T:
            if (game, "future", "embedding", T) in PAPER:
                mse, psnr, lpips = PAPER[(game, "future", "embedding", T)]
                rows.append({"game": game, "T": T, "method": PAPER_METHOD, "mse": mse, "psnr_of_mean_mse": psnr,
                             "lpips": lpips})
    df = pd.DataFrame(rows)
    for c in TABLE2_COLUMNS:
        if c not in df:
            df[c] = np.nan
    df["reported"] = df["seeds"].fillna(0) >= MIN_SEEDS  # fewer seeds: shown, not a reported result
    order = {m: i for i, m in enumerate(("model", "copy_last", "vae_recon", PAPER_METHOD))}
    df = df.assign(_g=df["game"].map(_game_order), _o=df["method"].map(order))
    df = df.sort_values(["_g", "T", "_o"], kind="stable")
    return df[TABLE2_COLUMNS + ["reported"]].reset_index(drop=True)


AF_COLUMNS = ["game", "test_set", "T", "idm_acc_real", "idm_f1_real", "idm_acc_generated", "idm_f1_generated",
              "idm_majority_share", "idm_acc_ratio", "idm_kappa_ratio", "dpsnr_vs_permuted", "dpsnr_ci_low",
              "dpsnr_ci_high", "dpsnr_vs_noop", "dpsnr_noop_ci_low", "dpsnr_noop_ci_high", "recorded_better_permuted",
              "seeds", "windows", "mse_recorded_vs_permuted", "psnr_of_mean_mse_recorded_vs_permuted", "mse_permuted",
              "psnr_of_mean_mse_permuted", "mse_recorded_vs_noop", "psnr_of_mean_mse_recorded_vs_noop", "mse_noop",
              "psnr_of_mean_mse_noop", "windows_noop"]
"""Columns of action_fidelity.csv (`pipeline.stats.action_rows` and `idm_columns` define them): idm_acc_ratio
is the plain ratio idm_acc_generated / idm_acc_real (the targets' "≥ 90 % of its accuracy on real frames"),
idm_kappa_ratio the chance-corrected one; `windows` counts the permuted difference's windows (per seed),
`windows_noop` the NOOP difference's; mse_* / psnr_of_mean_mse_* are each action set's MSE over the windows
of that difference (recorded_vs_<kind>: the recorded actions on <kind>'s windows)."""
_AF_FROM_ROWS = ("idm_acc_real", "idm_f1_real", "idm_acc_generated", "idm_f1_generated", "idm_majority_share",
                 "idm_acc_ratio", "idm_kappa_ratio", *(f"{pre}{kind}" for kind in ("permuted", "noop")
                                                       for pre in ("mse_recorded_vs_", "psnr_of_mean_mse_recorded_vs_",
                                                                   "mse_", "psnr_of_mean_mse_")), "windows_noop")


def action_fidelity(pooled: list[tuple[dict, dict]], n_boot: int = 2000) -> pd.DataFrame:
    """Per game and T: how much the recorded actions beat permuted and NOOP ones (dB, paired, with
    95 % episode intervals) and each action set's MSE / PSNR of the mean MSE on those windows, and the
    inverse-dynamics model's accuracy and macro-F1 on the generated frames beside the true ones of the
    same windows (idm_*_real: its ceiling there), pooled over seeds (`AF_COLUMNS`). A column that the
    pooled score files cannot give (e.g. no inverse-dynamics readings) is left empty."""
    from pipeline.stats import action_rows

    by_game: dict[tuple[str, str], list[dict]] = {}
    for meta, scores in pooled:
        if "action_recorded/mse" in scores:
            by_game.setdefault((meta["game"], test_set_of(meta)), []).append(scores)
    rows = []
    for game, test_set in sorted(by_game, key=lambda k: (_game_order(k[0]), TEST_SETS.index(k[1]))):
        for r in action_rows(by_game[(game, test_set)], TABLE2_T, n_boot=n_boot):
            rows.append({"game": game, "test_set": test_set, "T": r["T"], "seeds": r["seeds"],
                         "dpsnr_vs_permuted": r.get("dpsnr_vs_permuted"), "dpsnr_ci_low": r.get("dpsnr_perm_ci_low"),
                         "dpsnr_ci_high": r.get("dpsnr_perm_ci_high"), "dpsnr_vs_noop": r.get("dpsnr_vs_noop"),
                         "dpsnr_noop_ci_low": r.get("dpsnr_noop_ci_low"), "dpsnr_noop_ci_high": r.get("dpsnr_noop_ci_high"),
                         "recorded_better_permuted": r.get("recorded_better_permuted"),
                         "windows": r.get("windows_permuted"),
                         **{k: r[k] for k in _AF_FROM_ROWS if k in r}})
    df = pd.DataFrame(rows)
    for c in AF_COLUMNS:
        if c not in df:
            df[c] = np.nan
    return df[AF_COLUMNS]


IMAGINATION_COLUMNS = ["game", "agent", "return_mean", "return_ci_low", "return_ci_high", "episodes", "truncated",
                       "seeds", "diff_vs_random", "diff_ci_low", "diff_ci_high", "length_mean", "return_std_seeds"]
IMAGINATION_FILE = "imagine_returns.npz"
"""Per-game real returns of the imagine stage's agents, copied into a seed's record by run_all."""


def imagination(pooled: list[tuple[dict, dict]], n_boot: int = 2000, seed: int = 0,
                version: str | None = None) -> pd.DataFrame:
    """Per game and agent (imagination, random, ppo_real): the mean real-game return over seeds (each
    seed's games weigh as one seed), a 95 % bootstrap interval over games (resampled within each
    seed: it covers the games, not the training seeds, whose spread is `return_std_seeds`), and each
    agent's difference from the random agent with its interval. The agents play the same reset
    seeds, but each agent's games are resampled on their own: the interval ignores that pairing,
    which only widens it."""
    by: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for meta, _ in pooled:
        path = Path(meta.get("record_dir", "")) / IMAGINATION_FILE
        if not path.is_file():
            continue
        settings = Path(meta["record_dir"]) / "imagine.json"
        if version is not None and (not settings.is_file()
                                    or json.loads(settings.read_text()).get("imagine_version") != version):
            continue  # another imagine setting (budget, horizon, T, cap): not pooled with this one
        with np.load(path) as z:
            for key in z.files:
                agent, _, what = key.partition("__")
                if what == "returns":
                    by.setdefault((meta["game"], agent), []).append(
                        (z[key].astype(np.float64), z[f"{agent}__lengths"], z[f"{agent}__truncated"]))
    rows = []
    rng = np.random.default_rng(seed)
    from pipeline.stats import stratified_mean_resamples

    boots = {k: stratified_mean_resamples([g[0] for g in v], rng, n_boot) for k, v in by.items()}
    for (game, agent), v in sorted(by.items(), key=lambda kv: (_game_order(kv[0][0]), kv[0][1])):
        point = float(np.mean([g[0].mean() for g in v]))
        lo, hi = np.percentile(boots[(game, agent)], [2.5, 97.5])
        row = {"game": game, "agent": agent, "return_mean": point, "return_ci_low": lo, "return_ci_high": hi,
               "episodes": int(sum(len(g[0]) for g in v)), "truncated": int(sum(g[2].sum() for g in v)),
               "seeds": len(v), "length_mean": float(np.mean(np.concatenate([g[1] for g in v]))),
               "return_std_seeds": float(np.std([g[0].mean() for g in v], ddof=1)) if len(v) > 1 else np.nan}
        if (game, "random") in by and agent != "random":
            diff = boots[(game, agent)] - boots[(game, "random")]
            rnd = float(np.mean([g[0].mean() for g in by[(game, "random")]]))
            row.update(diff_vs_random=point - rnd, diff_ci_low=np.percentile(diff, 2.5),
                       diff_ci_high=np.percentile(diff, 97.5))
        rows.append(row)
    from pipeline.paper import PUBLISHED_RETURNS

    for game in sorted({g for g, _ in by}, key=_game_order):  # published scores, other protocols
        rows += [{"game": game, "agent": agent, "return_mean": value}
                 for (g, agent), value in PUBLISHED_RETURNS.items() if g == game]
    df = pd.DataFrame(rows)
    for c in IMAGINATION_COLUMNS:
        if c not in df:
            df[c] = np.nan
    return df[IMAGINATION_COLUMNS]


def markdown_table2(df: pd.DataFrame) -> str:
    """Table 2 as Markdown: MSE [95 % CI] (± seed std), PSNR of the mean MSE, dB over copy-last
    [CI], LPIPS, per game and T."""
    def f(x, nd=2):
        return "" if pd.isna(x) else f"{x:.{nd}f}"

    lines = ["| game | T | method | MSE [95 % CI] | seed std | PSNR | dB over copy-last [95 % CI] | LPIPS | seeds | "
             "windows | episodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        mse = f(r.mse) + (f" [{f(r.mse_ci_low)}, {f(r.mse_ci_high)}]" if not pd.isna(r.mse_ci_low) else "")
        db = (f"{f(r.db_over_copy_last)} [{f(r.db_ci_low)}, {f(r.db_ci_high)}]"
              if not pd.isna(r.db_over_copy_last) and r.method != "copy_last" else "")
        n = "" if pd.isna(r.seeds) else str(int(r.seeds)) + ("" if r.seeds >= MIN_SEEDS else " (too few)")
        lines.append(f"| {r.game} | {r.T} | {r.method} | {mse} | {f(r.mse_std_seeds)} | {f(r.psnr_of_mean_mse)} | "
                     f"{db} | {f(r.lpips, 4)} | {n} | {'' if pd.isna(r.windows) else int(r.windows)} | "
                     f"{'' if pd.isna(r.episodes) else int(r.episodes)} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_dirs(runs_root: Path, runs: list[Path] | None) -> list[Path]:
    """The run folders named (each must exist), else every recorded run under runs_root."""
    if runs:
        missing = [str(r) for r in runs if not Path(r).is_dir()]
        if missing:
            raise ResultsError(f"no run folder at {missing}")
        return [Path(r) for r in runs]
    if not Path(runs_root).is_dir():
        raise ResultsError(f"no runs folder at {runs_root}")
    return sorted(p for p in Path(runs_root).iterdir() if (p / "run.json").is_file())


def build_tables(runs_root: Path = DEFAULT_RUNS, out: Path = DEFAULT_OUT, preset: str = "gpu",
                 runs: list[Path] | None = None, version: str | None = None, n_boot: int = 2000,
                 command: str = "") -> pd.DataFrame:
    """Write `table2.csv`, `table2.md` and `table2.meta.json` under `out` from the recorded runs."""
    version = version or current_version(preset)
    explicit = bool(runs)
    dirs = _run_dirs(runs_root, runs)
    every, left = select_runs(dirs, preset, version, explicit)
    pooled = [(m, sc) for m, sc in every if test_set_of(m) == "test"]  # Table 2: the run's own test split
    if not pooled:
        raise ResultsError(f"no recorded run of preset {preset!r} version {version} on the test split in "
                           f"{runs if explicit else runs_root} ({len(left)} other runs: {left[:3]})")
    df = table2(pooled, n_boot=n_boot)
    _write(out / "table2.csv", df.to_csv(index=False, float_format="%.6g"))
    _write(out / "table2.md", markdown_table2(df))
    meta = {"table": "table2", "preset": preset, "preset_version": version, "ci": "95 % percentile bootstrap over "
            f"test episodes, {n_boot} resamples; mean over training seeds", "seed_ci": "mse_seed_ci_*: 95 % t-interval "
            "over the training seeds' own means", "T": "mean over generated frames 1..T",
            "built_by": command or f"python -m pipeline.results tables --preset {preset}",
            "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": [{**{k: m.get(k) for k in ("run_id", "game", "seed", "commit", "command", "gpu", "date")},
                      "vae_seed": (m.get("settings") or {}).get("vae", {}).get("seed")} for m, _ in pooled],
            "shared": "seeds recorded by one job share its collection and its VAE (vae_seed); each trains its own DiT. "
                      "Runs whose windows come from the same episode positions (a rerun of the same collection "
                      "settings; workers.schema.episode_position) share one episode resample",
            "not_pooled": left,
            "paper": "the paper's cells (method 'paper (other data)') were measured on data and at a resolution "
                     "it does not state; ALE's DemonAttack frames change 24-113x more than its model error"}
    _write(out / "table2.meta.json", json.dumps(meta, indent=1))
    from pipeline.presets import PRESETS, imagine_version

    im_version = imagine_version(PRESETS[preset]()) if preset in PRESETS else None
    im = imagination(pooled, n_boot=n_boot, version=im_version)
    if len(im):
        _write(out / "imagination.csv", im.to_csv(index=False, float_format="%.6g"))
        _write(out / "imagination.meta.json", json.dumps(
            {**meta, "table": "imagination", "ci": f"95 % percentile bootstrap over real games, resampled within "
             f"each seed, {n_boot} resamples; mean over seeds of each seed's mean return",
             "imagine_version": im_version,
             "agents": "imagination: PPO trained only in the seed's world model (pipeline/imagine.py); random: "
             "uniform actions; ppo_real: the PPO agent that recorded the collection",
             "games": "full real games (sticky actions 0.25) to game over, cut at the run's eval_max_steps "
             "(column truncated)"}, indent=1))
    af = action_fidelity(every, n_boot=n_boot)
    if len(af):
        others = [{k: m.get(k) for k in ("run_id", "game", "seed", "commit", "command", "gpu", "date")}
                  for m, _ in every if test_set_of(m) != "test"]
        _write(out / "action_fidelity.csv", af.to_csv(index=False, float_format="%.6g"))
        _write(out / "action_fidelity.meta.json", json.dumps(
            {**meta, **({"other_policy_runs": others} if others else {}), "table": "action_fidelity",
             "test_set": "test: the test split of each run's own collection (the runs above); other_policy: the "
             "test split of another policy's collection (run.json test_set, other_policy_runs)", "windows": "windows (per seed) whose first T permuted future actions "
             "differ from the recorded ones", "dpsnr": "PSNR of the mean MSE with the recorded actions minus "
             "with permuted (another window's) or NOOP future actions, same condition frames and noise",
             "idm": "inverse-dynamics model trained on real training pairs of the run's collection, read on the "
             "recorded rollout's pairs (generated) and the same windows' true pairs (real), frames 1..T",
             "idm_acc_ratio": "idm_acc_generated / idm_acc_real (plain ratio: what the action-accuracy targets read)",
             "idm_kappa_ratio": "(idm_acc_generated - idm_majority_share) / (idm_acc_real - idm_majority_share): "
             "chance-corrected, 0 = no better than a constant guess",
             "windows_noop": "windows (per seed) whose first T NOOP future actions differ from the recorded ones",
             "mse": "mse_<kind> / mse_recorded_vs_<kind>: MSE (0-255 scale) over frames 1..T with <kind> (permuted, "
             "noop) or the recorded future actions, on the windows of that difference, mean over seeds; "
             "psnr_of_mean_mse_*: 10 log10(255^2 / that MSE), so dpsnr_vs_<kind> = psnr_of_mean_mse_recorded_vs_<kind>"
             " - psnr_of_mean_mse_<kind>"}, indent=1))
    return df


# -- Tables 3 and 4: the sweep trials ------------------------------------------------------------------
ABLATION_COLUMNS = ["game", "T", "method", "variant", "mse", "mse_ci_low", "mse_ci_high", "mse_std_seeds",
                    "psnr_of_mean_mse", "lpips", "idm_acc_generated", "diff_vs_reference", "diff_ci_low",
                    "diff_ci_high", "seeds", "windows", "episodes"]
ABLATIONS: dict[str, tuple[str, str]] = {"table3": ("action_mode", "action_encoder"),
                                         "table4": ("action_encoder", "action_mode")}
"""Table -> (the setting it varies, the setting it holds at the reference's value)."""


def _reference() -> dict[str, str]:
    from tune_spaces.spaces import REFERENCE

    return dict(REFERENCE)


def current_sweep_versions(preset: str) -> dict[str, str]:
    """{sweep version: space} of the preset's sweeps whose trials vary action_mode or action_encoder,
    as the code defines them now (`pipeline.sweep.sweep_version`)."""
    from pipeline.presets import PRESETS
    from pipeline.sweep import preset_sweep_config, swept_fields, sweep_version

    if preset not in PRESETS:
        raise ResultsError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    p = PRESETS[preset]()
    out = {}
    for space, fields in p.sweeps:
        cfg = preset_sweep_config(p, space, fields)
        if {"action_mode", "action_encoder"} & set(swept_fields(cfg)):
            out[sweep_version(cfg)] = space
    return out


def select_trials(run_dirs: list[Path], versions: set[str], explicit: bool
                  ) -> tuple[list[tuple[dict, dict]], list[dict[str, str]]]:
    """The sweep trials to pool (a version in `versions`, test split, one record per game, version,
    variant, trained lengths and seed: the newest; within a game and version, one collection and VAE
    setting: the newest trial's) and the trials left out with the reason. Named explicitly, a trial
    that does not qualify is an error; records of a job's evaluation are not candidates."""
    candidates, left = [], []
    for d in run_dirs:
        meta, scores = load_run(d)
        if meta.get("kind") != TRIAL_KIND:
            if explicit:
                raise ResultsError(f"{d}: not a sweep trial (a job's evaluation: `tables` pools it)")
            continue
        why = None
        if meta["preset_version"] not in versions:
            why = f"sweep version {meta['preset_version']}, not a current one ({sorted(versions)})"
        elif meta["split"] != "test":
            why = f"scored on the {meta['split']!r} split, not test"
        if why and explicit:
            raise ResultsError(f"{d}: {why}: only trials of a current sweep version on the test split pool")
        if why:
            left.append({"run_id": meta.get("run_id", d.name), "why": why})
        else:
            candidates.append((meta, scores))
    newest: dict[tuple, tuple[dict, dict]] = {}
    for meta, scores in sorted(candidates, key=lambda ms: ms[0].get("date", "")):
        v = meta["variant"]
        key = (meta["game"], meta["preset_version"], v["action_mode"], v["action_encoder"],
               tuple(meta["trained_horizons"]), int(meta["seed"]))
        if key in newest:
            left.append({"run_id": newest[key][0].get("run_id"), "why": f"an older record of {key[0]} "
                         f"{v['action_mode']}+{v['action_encoder']} seed {key[-1]}"})
        newest[key] = (meta, scores)
    kept = sorted(newest.values(), key=lambda ms: ms[0].get("date", ""))
    upstream: dict[tuple[str, str], str] = {}
    for meta, _ in reversed(kept):  # the newest trial of a game and version sets its collection/VAE settings
        upstream.setdefault((meta["game"], meta["preset_version"]), meta.get("upstream_version", ""))
    pooled = []
    for meta, scores in kept:
        want = upstream[(meta["game"], meta["preset_version"])]
        if meta.get("upstream_version", "") != want:
            left.append({"run_id": meta.get("run_id"), "why": f"collection/VAE settings {meta.get('upstream_version')}, "
                         f"not those of the newest {meta['game']} trial ({want})"})
        else:
            pooled.append((meta, scores))
    return pooled, left


def _paired_diff(var: dict[int, dict], ref: dict[int, dict], T: int, method: str, n_boot: int
                 ) -> tuple[Any, list[int], list[str]]:
    """mean over the seeds both sides have of (method's MSE - the reference model's), window by window
    lined up by (episode_id, start_step), with its 95 % episode-bootstrap interval. A seed whose two
    sides were scored on other windows (another collection) is left out, with a note."""
    from pipeline.stats import EpisodeBootstrap, align, window_keys
    from workers.evaluate import window_scores

    eids, diffs, used, notes = [], [], [], []
    for seed in sorted(set(var) & set(ref)):
        r, v = ref[seed], var[seed]
        try:
            idx = align(window_keys(r["episode_id"], r["start_step"]), window_keys(v["episode_id"], v["start_step"]),
                        what=f"seed {seed}")
        except ValueError as exc:
            notes.append(f"T={T} {method} seed {seed}: not paired: {exc}")
            continue
        got_v, got_r = window_scores(v, method, "mse", T), window_scores(r, "model", "mse", T)
        if got_v is None or got_r is None:
            continue
        eids.append(np.asarray(r["episode_id"]))
        diffs.append(got_v[0][idx] - got_r[0])
        used.append(seed)
    if not used:
        return None, [], notes
    ci, _ = EpisodeBootstrap(eids, n_boot=n_boot).mean(diffs)
    return ci, used, notes


def _variant_row(runs: dict[int, dict], T: int, method: str, n_boot: int) -> dict[str, Any]:
    """A method's row pooled over the seeds of one variant (`pipeline.stats.pooled_rows`), with the
    inverse-dynamics accuracy on its generated frames where the trials measured it."""
    from pipeline.stats import action_rows, pooled_rows

    scores = [runs[s] for s in sorted(runs)]
    row = next(r for r in pooled_rows(scores, (T,), n_boot=n_boot) if r["method"] == method)
    out = {k: row.get(k) for k in ("mse", "mse_ci_low", "mse_ci_high", "mse_std_seeds", "psnr_of_mean_mse", "lpips",
                                   "seeds", "windows", "episodes")}
    if method == "model":
        acts = action_rows(scores, (T,), n_boot=n_boot)
        if acts and "idm_acc_generated" in acts[0]:
            out["idm_acc_generated"] = acts[0]["idm_acc_generated"]
    return out


def ablation_table(pooled: list[tuple[dict, dict]], table: str, n_boot: int = 2000
                   ) -> tuple[pd.DataFrame, list[str]]:
    """Table 3 (action_mode, encoder held at the reference's) or 4 (action_encoder, mode held) from the
    sweep trials whose sweep varied that setting: per game and T, one `model` row per variant pooled
    over its seeds, the copy-last row on the reference trials' windows, and the paper's cells; each
    row's difference in MSE from the reference model (paired, same windows and seeds). Returns the
    table and notes on what a difference left out."""
    from pipeline.paper import PAPER
    from tune_spaces.spaces import CHOICES

    axis, held = ABLATIONS[table]
    reference = _reference()
    order = {v: i for i, v in enumerate(CHOICES[axis])}
    by_game: dict[str, list[tuple[dict, dict]]] = {}
    for meta, scores in pooled:
        sweep = meta.get("sweep") or {}
        if axis in sweep.get("fields", ()) and meta["variant"][held] == reference[held]:
            by_game.setdefault(meta["game"], []).append((meta, scores))
    rows, notes = [], []
    for game in sorted(by_game, key=_game_order):
        trials = by_game[game]
        versions = sorted({m["preset_version"] for m, _ in trials})
        if len(versions) > 1:
            raise ResultsError(f"{table}, {game}: trials of several sweep versions {versions} vary {axis}: "
                               f"name one with --sweep-version")
        for T in sorted({int(t) for m, _ in trials for t in m["horizons"]}):
            groups: dict[str, dict[int, dict]] = {}
            for meta, scores in trials:
                if T not in meta["horizons"]:
                    continue
                runs = groups.setdefault(meta["variant"][axis], {})
                if int(meta["seed"]) in runs:
                    raise ResultsError(f"{table}, {game}, T={T}: two trials of {meta['variant'][axis]} seed "
                                       f"{meta['seed']} are scored at T={T} (e.g. {meta['run_id']})")
                runs[int(meta["seed"])] = scores
            ref = groups.get(reference[axis])
            if ref is None:
                notes.append(f"{game} T={T}: no reference ({reference[axis]}) trial: no differences")
            for value in sorted(groups, key=lambda v: (v != reference[axis], order.get(v, len(order)), v)):
                row = {"game": game, "T": T, "method": "model", "variant": value,
                       **_variant_row(groups[value], T, "model", n_boot)}
                if ref is not None and value != reference[axis]:
                    ci, used, why = _paired_diff(groups[value], ref, T, "model", n_boot)
                    notes += [f"{game} {value}: {w}" for w in why]
                    if ci is not None:
                        row.update(diff_vs_reference=ci.value, diff_ci_low=ci.low, diff_ci_high=ci.high,
                                   diff_seeds=len(used))
                rows.append(row)
            if ref is not None:
                row = {"game": game, "T": T, "method": "copy_last", "variant": "",
                       **_variant_row(ref, T, "copy_last", n_boot)}
                ci, used, _ = _paired_diff(ref, ref, T, "copy_last", n_boot)
                if ci is not None:
                    row.update(diff_vs_reference=ci.value, diff_ci_low=ci.low, diff_ci_high=ci.high,
                               diff_seeds=len(used))
                rows.append(row)
            for value in sorted(groups, key=lambda v: (v != reference[axis], order.get(v, len(order)), v)):
                cell = PAPER.get((game, *((value, reference[held]) if axis == "action_mode" else
                                          (reference[held], value)), T))
                if cell:
                    rows.append({"game": game, "T": T, "method": PAPER_METHOD, "variant": value, "mse": cell[0],
                                 "psnr_of_mean_mse": cell[1], "lpips": cell[2]})
    df = pd.DataFrame(rows)
    for c in ABLATION_COLUMNS + ["diff_seeds"]:
        if c not in df:
            df[c] = np.nan
    df["reported"] = df["seeds"].fillna(0) >= MIN_SEEDS  # fewer seeds: shown, not a reported result
    return df[ABLATION_COLUMNS + ["reported", "diff_seeds"]].reset_index(drop=True), notes


def markdown_ablation(df: pd.DataFrame, table: str) -> str:
    """An ablation table as Markdown: MSE [95 % CI] (± seed std), PSNR of the mean MSE, LPIPS, the
    inverse-dynamics accuracy, and the MSE difference from the reference [95 % CI]."""
    def f(x, nd=2):
        return "" if pd.isna(x) else f"{x:.{nd}f}"

    axis = ABLATIONS[table][0]
    lines = [f"| game | T | method | {axis} | MSE [95 % CI] | seed std | PSNR | LPIPS | IDM acc. | "
             "MSE - reference [95 % CI] | seeds | windows | episodes |", "|---" * 13 + "|"]
    for r in df.itertuples():
        mse = f(r.mse) + (f" [{f(r.mse_ci_low)}, {f(r.mse_ci_high)}]" if not pd.isna(r.mse_ci_low) else "")
        diff = ("" if pd.isna(r.diff_vs_reference) else
                f"{f(r.diff_vs_reference)} [{f(r.diff_ci_low)}, {f(r.diff_ci_high)}]")
        n = "" if pd.isna(r.seeds) else str(int(r.seeds)) + ("" if r.seeds >= MIN_SEEDS else " (too few)")
        lines.append(f"| {r.game} | {r.T} | {r.method} | {r.variant} | {mse} | {f(r.mse_std_seeds)} | "
                     f"{f(r.psnr_of_mean_mse)} | {f(r.lpips, 4)} | {f(r.idm_acc_generated, 3)} | {diff} | {n} | "
                     f"{'' if pd.isna(r.windows) else int(r.windows)} | {'' if pd.isna(r.episodes) else int(r.episodes)} |")
    return "\n".join(lines) + "\n"


def build_ablations(runs_root: Path = DEFAULT_RUNS, out: Path = DEFAULT_OUT, preset: str = "gpu",
                    runs: list[Path] | None = None, versions: list[str] | None = None, n_boot: int = 2000,
                    command: str = "") -> dict[str, pd.DataFrame]:
    """Write `table3.csv` and `table4.csv` (+ `.md`, `.meta.json`) under `out` from the recorded sweep
    trials of the preset's current sweep versions (or of `versions`); a table no trial varies is not
    written."""
    current = {v: "(named)" for v in versions} if versions else current_sweep_versions(preset)
    if not current:
        raise ResultsError(f"preset {preset!r} defines no sweep that varies action_mode or action_encoder: "
                           f"name a sweep version with --sweep-version")
    explicit = bool(runs)
    dirs = _run_dirs(runs_root, runs)
    pooled, left = select_trials(dirs, set(current), explicit)
    if not pooled:
        raise ResultsError(f"no recorded sweep trial of version(s) {sorted(current)} on the test split in "
                           f"{runs if explicit else runs_root} ({len(left)} other trials: {left[:3]})")
    built = {}
    for table, (axis, held) in ABLATIONS.items():
        df, notes = ablation_table(pooled, table, n_boot=n_boot)
        if not len(df):
            continue
        used = {(m["game"], m["run_id"]) for m, _ in pooled
                if axis in (m.get("sweep") or {}).get("fields", ()) and m["variant"][held] == _reference()[held]}
        meta = {"table": table, "preset": preset, "sweep_versions": current, "varies": axis,
                "reference": _reference(), "T": "mean over generated frames 1..T",
                "ci": f"95 % percentile bootstrap over test episodes, {n_boot} resamples; mean over training seeds",
                "diff": "diff_vs_reference: mean over the seeds both have (diff_seeds) of the per-window MSE minus "
                        "the reference model's on the same window (episode_id, start_step) and seed, with its "
                        "paired 95 % episode-bootstrap interval; copy_last rows: copy-last minus the reference model",
                "idm": "idm_acc_generated: accuracy of the inverse-dynamics model (trained on real training pairs "
                       "of the trial's collection) on the recorded rollout's frames 1..T, pooled over seeds",
                "reported": f"rows with fewer than {MIN_SEEDS} seeds are shown, not reported",
                "built_by": command or f"python -m pipeline.results ablations --preset {preset}",
                "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "trials": [{**{k: m.get(k) for k in ("run_id", "game", "seed", "commit", "command", "gpu", "date",
                                                     "preset_version", "upstream_version")},
                            "variant": m["variant"], "trained_horizons": m.get("trained_horizons")}
                           for m, _ in pooled if (m["game"], m["run_id"]) in used],
                "not_pooled": left, "notes": notes,
                "paper": "the paper's cells (method 'paper (other data)') were measured on data and at a resolution "
                         "it does not state"}
        _write(out / f"{table}.csv", df.to_csv(index=False, float_format="%.6g"))
        _write(out / f"{table}.md", markdown_ablation(df, table))
        _write(out / f"{table}.meta.json", json.dumps(meta, indent=1, default=list))
        built[table] = df
    if not built:
        raise ResultsError(f"none of the {len(pooled)} pooled trials varies action_mode or action_encoder "
                           f"around the reference {_reference()}")
    return built


@dataclass(frozen=True)
class TablesCommand:
    """Build Table 2 and the action-fidelity and imagination tables from the recorded runs."""

    runs: str = str(DEFAULT_RUNS)
    """Folder of recorded runs and sweep trials (<run-id>/run.json)."""
    run: tuple[str, ...] = ()
    """Pool only these run folders; empty = every run under --runs."""
    out: str = str(DEFAULT_OUT)
    """Where the tables go."""
    preset: str = "gpu"
    """Preset whose current version is pooled."""
    n_boot: int = 2000
    """Bootstrap resamples."""


@dataclass(frozen=True)
class AblationsCommand(TablesCommand):
    """Build Tables 3 and 4 from the recorded sweep trials of the preset's current sweep versions."""

    sweep_version: tuple[str, ...] = ()
    """Pool these sweep versions instead of the preset's current ones."""


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import parse_command

    verb, a, _ = parse_command({"tables": TablesCommand, "ablations": AblationsCommand}, argv,
                               description=__doc__, tracking=False)
    command = "python -m pipeline.results " + " ".join(argv if argv is not None else sys.argv[1:])
    out, runs = Path(a.out), Path(a.runs)
    chosen = [Path(r) for r in a.run] or None
    try:
        if verb == "ablations":
            tables = build_ablations(runs, out, a.preset, chosen, list(a.sweep_version) or None,
                                     n_boot=a.n_boot, command=command)
        else:
            df = build_tables(runs, out, a.preset, chosen, n_boot=a.n_boot, command=command)
    except ResultsError as exc:
        print(f"[results] {exc}", file=sys.stderr)
        return 2
    if verb == "ablations":
        for table, df in tables.items():
            print(markdown_ablation(df, table))
        print(f"[results] wrote {', '.join(f'{out}/{t}.csv' for t in tables)} (+ .md, .meta.json)")
        return 0
    print(markdown_table2(df))
    print(f"[results] wrote {out}/table2.csv, table2.md, table2.meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
