"""Evaluation driver: score a trained world model on held-out episodes, log tables and figures.

    python -m pipeline.evaluate --run-dir /abs/runs/x --model-path /abs/runs/x/models/dit-Breakout \\
        --data-root /abs/data --games Breakout

For each game: windows of n + max(horizons) frames from the test split (episodes never seen in
training; `split="val"` scores the val split while choosing settings), rolled out once to the longest horizon through Ray Data (`workers.evaluate.ScoreWindows`),
scored per frame at native 210x160 beside the copy-last-frame baseline and the VAE's reconstruction
of the true frames (method `vae_recon`, the floor under the model's error). Horizons past the model's
trained length are chained chunks. A shorter horizon that the model was trained to generate gets
its own rollout of that many frames (column `rollout` = "direct", as in the paper's Table 2); any
other is scored on the first frames of the long rollout ("prefix"). Outputs, under `<run_dir>/eval/<name>/` and in one MLflow run:

- `tables/generation_length.json`: game x generation length x method, MSE/PSNR/LPIPS mean and std
  over windows, with 95 % intervals over the held-out episodes (`CI_COLUMNS`) (the layout of the paper's Table 2; Tables 3 and 4 are the same rows across runs
  that differ in action_mode / action_encoder, which are columns here);
- `tables/per_frame.json`: the same per generated frame, the model's rows with the inverse-dynamics
  accuracy and macro-F1 of each generated frame of the action test (`workers.evaluate.frame_table`);
- `tables/action_fidelity.json`: recorded vs permuted and NOOP actions, and the inverse-dynamics
  measures, per T (`pipeline.stats.action_rows`);
- `tables/vs_paper.json`: where the paper reports the setting (`pipeline/paper.py`), its cells beside
  ours and copy-last's;
- metrics `eval/<game>/<method>/<metric>_h<h>` (MLflow forbids '@' in names); figures: frame strips, action strips, GIFs, and
  each metric against horizon.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/evaluate.py`): run again as `python -m pipeline.evaluate`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.evaluate", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np
import pandas as pd
import torch

from pipeline import cli, figures, paper
from pipeline.cluster import ensure_ray, require_lpips_weights
from pipeline.stats import action_rows, pooled_rows
from pipeline.tracking import Tracker
from workers.data import spread_window_dataset
from models.action_encoder import first_action_frame
from workers.evaluate import METRICS, ScoreWindows, frame_table, horizon_table, partner_keys, score_windows
from workers.world_model import load_world_model


CI_COLUMNS = ("mse_ci_low", "mse_ci_high", "lpips_ci_low", "lpips_ci_high", "db_over_copy_last", "db_ci_low",
              "db_ci_high", "episodes")
"""Columns of the generation_length table beside the means: 95 % episode-bootstrap intervals, the dB
over copy-last (paired on the same windows) and the number of held-out episodes."""


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation."""

    run_dir: str = "runs/default"
    """Pipeline run directory (the MLflow store and eval outputs go here)."""
    model_path: str = ""
    """World-model directory written by train_dit_main (or downloaded from MLflow)."""
    data_root: str = ""
    """Root of the collected episodes."""
    split: str = "test"
    """Episode split scored: `test` for a run's final evaluation, `val` while choosing settings."""
    games: tuple[str, ...] = ()
    """Games to score; empty = the game the model was trained on."""
    name: str = "eval"
    """MLflow run name of this evaluation."""
    horizons: tuple[int, ...] = (1, 2, 4, 8)
    """Generation lengths scored (past the trained length, chunks are chained)."""
    stride: int = 16
    """Stride of the evaluation windows in each test episode."""
    max_windows: int = 128
    """Windows scored per game: all the test split's windows, or this many spread evenly over them
    in (episode, start) order, so that every held-out episode weighs in, not the first few."""
    batch_size: int = 8
    """Windows per model call."""
    lpips: bool = True
    """Score LPIPS (AlexNet v0.1 at 210x160) besides MSE and PSNR."""
    vae_recon: bool = True
    """Also score the VAE's reconstruction of the true future frames (method "vae_recon"): the
    floor under the model's error, which says how much of it the VAE accounts for."""
    sample_steps: int = 0
    """Euler steps; 0 = the model's own setting."""
    guidance_scale: float = 0.0
    """Classifier-free guidance over actions at sampling (1 = none; 0 = the model's own setting);
    above 1 it needs a DiT trained with `action_dropout` > 0."""
    seed: int = 0
    """Seed of the sampler's noise."""
    figure_windows: int = 2
    """Windows drawn as frame strips and GIFs per game; 0 = no figures (nor action strips)."""
    action_sequences: tuple[str, ...] = ("each",)
    """Action sequences of the counterfactual strips, all from the first strip window's condition
    frames and with the same noise: "each" = one row per action of the game's action set, that
    action held for the model's trained length (rows named by the action's meaning); otherwise
    sequences of action ids, as digits ("3222") or comma-separated ("10,10,11"); () = none."""
    windows_of: str = ""
    """Scores file (`<game>_scores.npz`) of an earlier evaluation on the same data: score exactly its
    windows (by episode_id and start_step) instead of `max_windows` of its own, so that two models
    are compared on the same held-out windows. Needs one game."""
    action_tests: bool = True
    """Also roll out every window with permuted and with NOOP future actions on the same noise
    (`workers.evaluate.action_rollouts`; the model's trained length), and report how much the
    recorded actions beat them (`action_fidelity` table): whether the model follows its actions."""
    idm_steps: int = 2000
    """Training steps of the inverse-dynamics model (`workers/inverse_dynamics.py`) that reads the
    action tests' recorded rollouts: trained once per collection and game on real training pairs,
    cached under `<run_dir>/idm/`; 0 = no inverse-dynamics measure."""
    idm_data_root: str = ""
    """Collection whose training split the inverse-dynamics model learns from; "" = `data_root`. Set
    it to the world model's own collection when scoring another policy's data (e.g. a random
    policy collected under its own data root, `CollectConfig.random_repeat`)."""
    idm_max_pairs: int = 8192
    """Real training pairs the inverse-dynamics model sees at most (a seeded subset)."""
    num_cpus: float = 1.0
    """CPUs of the scoring actor."""
    use_gpu: bool = False
    """Score on a GPU."""
    num_gpus: float = 1.0
    """With use_gpu: the GPU share of the scoring actor and tasks (below 1, evaluations share one)."""

    def __post_init__(self) -> None:
        from workers.schema import SPLITS

        if self.split not in SPLITS:
            raise ValueError(f"EvalConfig.split={self.split!r} is no split; splits are {list(SPLITS)}")
        if not 0.0 < self.num_gpus <= 1.0:
            raise ValueError(f"EvalConfig.num_gpus={self.num_gpus}: expected a GPU share in (0, 1]")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"EvalConfig.horizons must be positive ints, got {self.horizons}")
        if self.windows_of and len(self.games) != 1:
            raise ValueError(f"EvalConfig.windows_of={self.windows_of!r} names one game's windows: give exactly "
                             f"one game, got {self.games}")


def window_keys(scores_file: str) -> set[tuple[str, int]]:
    """(episode_id, start_step) of every window scored in an evaluation's `<game>_scores.npz`."""
    path = Path(scores_file)
    if not path.is_file():
        raise FileNotFoundError(f"EvalConfig.windows_of: no scores file at {path}")
    with np.load(path, allow_pickle=False) as z:
        if "episode_id" not in z or "start_step" not in z:
            raise ValueError(f"EvalConfig.windows_of: {path} has no episode_id/start_step arrays")
        return {(str(e), int(s)) for e, s in zip(z["episode_id"], z["start_step"])}


def prepare_idm(idm_root: str, data_root: str, game: str, steps: int, max_pairs: int, cache_dir: str,
                split: str, device: str) -> tuple[str, dict]:
    """The inverse-dynamics model of a game learnt from `idm_root`'s train split (once, then cached):
    its folder, and its scores on the real pairs of `data_root`'s `split` (the ceiling)."""
    from workers.inverse_dynamics import IDMConfig, cached_idm, real_pair_scores

    cfg = IDMConfig(steps=steps, max_pairs=max_pairs)
    same = os.path.abspath(idm_root) == os.path.abspath(data_root)
    model, meta = cached_idm(idm_root, game, cfg, cache_dir, eval_split=split if same else None, device=device)
    if not same:
        meta = {**meta, "eval": real_pair_scores(model.cpu(), data_root, game, split, cfg)}
    return meta["path"], {k: meta[k] for k in ("eval", "train", "trained") if k in meta}


def score_game(cfg: EvalConfig, game: str, n_cond: int, trained: tuple[int, ...] = (), idm_path: str = ""
               ) -> tuple[dict[str, np.ndarray], Any]:
    """Per-window per-frame scores of one game, computed by a Ray Data actor; every horizon shorter
    than the longest that the model was trained to generate (`trained`) also gets its own rollout."""
    H = max(cfg.horizons)
    # max_windows spread over the split, or exactly the windows of an earlier evaluation
    ds, n = spread_window_dataset(cfg.data_root, game, cfg.split, n_cond + H, cfg.stride, cfg.max_windows,
                                  keys=window_keys(cfg.windows_of) if cfg.windows_of else None)
    ds = ds.materialize()  # once: scoring and the figures read the same windows
    if ds.count() != n:
        where = f"the {n} windows of {cfg.windows_of}" if cfg.windows_of else f"the {n} windows chosen"
        raise ValueError(f"EvalConfig: {ds.count()} of {where} are in {cfg.data_root} ({game}, length {n_cond + H}, "
                         f"stride {cfg.stride}): same data and settings?")
    partners = None
    if cfg.action_tests:  # the permuted test's partners, fixed over the whole set of windows
        small = ds.select_columns(["episode_id", "start_step", "actions"]).take_all()
        acts = {(str(r["episode_id"]), int(r["start_step"])): np.asarray(r["actions"], dtype=np.int64) for r in small}
        partners = {k: acts[v] for k, v in partner_keys(list(acts)).items()} or None
    scored = ds.map_batches(
        ScoreWindows, batch_size=cfg.batch_size, concurrency=1, num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus if cfg.use_gpu else 0,
        fn_constructor_kwargs={"model_path": cfg.model_path, "horizon": H, "lpips": cfg.lpips,
                               "sample_steps": cfg.sample_steps or None, "seed": cfg.seed,
                               "device": "cuda" if cfg.use_gpu else "cpu",
                               "direct": tuple(h for h in cfg.horizons if h in trained and h < H),
                               "vae_recon": cfg.vae_recon,
                               "action_horizon": max(trained) if cfg.action_tests and trained else 0,
                               "guidance_scale": cfg.guidance_scale or None, "idm_path": idm_path,
                               "partner_actions": partners})
    parts = list(scored.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        old = (" (a collection made before the val split existed has none: collect with "
               "CollectConfig.val_fraction > 0)" if cfg.split == "val" else "")
        raise ValueError(f"no {cfg.split} windows of {n_cond + H} frames for game {game!r} under {cfg.data_root}{old}")
    return {k: np.concatenate([np.stack(p[k]) for p in parts]) for k in parts[0]}, ds


def figure_rollouts(model_path: str, sample_steps: int | None, device: str, frames: np.ndarray, actions: np.ndarray,
                    horizon: int, action_sequences: tuple[str, ...], seed: int, guidance_scale: float | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The figures' generated frames, computed where scoring runs (a Ray task with the scoring
    actor's resources: on the GPU when evaluation uses one, never on the driver's CPU).

    frames: uint8 (B, n + horizon, H, W, 3) and actions (B, n + horizon) of the strip windows ->
    (the rollouts uint8 (B, horizon, H, W, 3), {sequence: uint8 (len, H, W, 3)} rolled out from
    the first window's condition frames with each action sequence)."""
    wm = load_world_model(model_path, device, sample_steps=sample_steps, guidance_scale=guidance_scale)
    f, a = torch.from_numpy(frames), torch.from_numpy(actions)
    g = torch.Generator(device=device).manual_seed(seed)
    _, pred = score_windows(wm, f, a, horizon, None, g)
    n, rollouts = wm.n_cond, {}
    # the mode's past actions (none for "future"): the first window's, from the mode's first action
    # frame up to the last condition frame (models.action_encoder.ACTION_MODES)
    past = a[:1, first_action_frame(n, wm.action_mode): n - 1]
    state = g.get_state()
    for seq in action_sequences:
        ids = parse_sequence(seq)
        future = torch.tensor(ids, dtype=torch.int64)[None]  # (1, T)
        acts = torch.cat([past, future], dim=1)  # (1, num_action_tokens(n, T, mode))
        g.set_state(state)  # the same noise for every sequence: only the actions differ
        rollouts[seq] = wm.predict(f[:1, :n], acts, len(ids), generator=g)[0].numpy()
    return pred.numpy(), rollouts


def parse_sequence(seq: str) -> list[int]:
    """An action sequence of the strips: "3222" (digits) or "10,10,11" (comma-separated ids)."""
    try:
        return [int(c) for c in (seq.split(",") if "," in seq else seq)]
    except ValueError:
        raise ValueError(f"EvalConfig.action_sequences: {seq!r} is no sequence of action ids "
                         f"(digits, or ids separated by commas)") from None


def game_action_meanings(data_root: str, game: str) -> tuple[str, ...]:
    """The meaning of each action id of a game as its episodes recorded it (ALE's names)."""
    from workers.atari import action_meanings
    from workers.inverse_dynamics import dataset_env

    return action_meanings(*dataset_env(data_root, game))


def scoring_task(fn, cfg: EvalConfig):
    """`fn` as a Ray task with the scoring actor's CPUs and GPU. It is scheduled on the cluster, not
    inside the caller's placement group: a Tune trial's placement group (which captures its child
    tasks) holds only the trial's own small bundle."""
    import ray

    return ray.remote(fn).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus if cfg.use_gpu else 0,
                                  scheduling_strategy="DEFAULT")


def draw_figures(cfg: EvalConfig, n_cond: int, ds, game: str, out_dir: Path, tracker: Tracker,
                 strip_length: int = 4) -> None:
    """Frame strips and GIFs of the first windows, and the counterfactual action strips from the
    first window (`EvalConfig.action_sequences`; "each" holds each action `strip_length` frames)."""
    import ray

    H, n = max(cfg.horizons), n_cond
    sequences, names = tuple(cfg.action_sequences), {}
    if sequences == ("each",):
        meanings = game_action_meanings(cfg.data_root, game)
        sequences = tuple(",".join([str(i)] * strip_length) for i in range(len(meanings)))
        names = {seq: meanings[i] for i, seq in enumerate(sequences)}
    else:
        for seq in sequences:
            parse_sequence(seq)  # a bad sequence fails here, naming it
    batch = ds.take_batch(cfg.figure_windows)
    frames = np.ascontiguousarray(np.stack(batch["frames"]))
    actions = np.stack(batch["actions"]).astype(np.int64)
    task = scoring_task(figure_rollouts, cfg)
    pred, rollouts = ray.get(task.remote(cfg.model_path, cfg.sample_steps or None, "cuda" if cfg.use_gpu else "cpu",
                                         frames, actions, H, sequences, cfg.seed,
                                         cfg.guidance_scale or None))
    for i in range(len(frames)):
        fig = figures.frame_strip(frames[i, :n], pred[i], frames[i, n:n + H],
                                  title=f"{game}: condition | generated / truth")
        tracker.log_figure(fig, f"figures/{game}/strip_{i}.png")
        gif = figures.rollout_gif(out_dir / f"{game}_rollout_{i}.gif", pred[i], frames[i, n:n + H], cond=frames[i, :n])
        tracker.log_artifact(gif, f"figures/{game}")
    if rollouts:
        labelled = {names.get(seq, seq): frames_ for seq, frames_ in rollouts.items()}
        steps = {names.get(seq, seq): [str(i) for i in parse_sequence(seq)] for seq in rollouts}
        fig = figures.action_strips(frames[0, :n], labelled, title=f"{game}: same condition and noise, different actions",
                                    frame_actions=steps)
        tracker.log_figure(fig, f"figures/{game}/actions.png")


def write_tables(out_dir: Path, tables: dict[str, pd.DataFrame]) -> None:
    """`<name>.csv` for each table, each replaced whole (a killed evaluation leaves the last
    complete version, never a half-written file)."""
    for name, df in tables.items():
        tmp = out_dir / f".{name}.csv.tmp"
        df.to_csv(tmp, index=False)
        os.replace(tmp, out_dir / f"{name}.csv")


def main(cfg: EvalConfig, tracking_uri: str | None = None) -> dict[str, pd.DataFrame]:
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().resolve()))
    if not cfg.model_path:
        raise ValueError("EvalConfig.model_path is empty: point it at a trained world-model directory")
    ensure_ray()
    if cfg.lpips:
        require_lpips_weights(cfg.use_gpu)  # before any scoring actor starts without them
    world_model = load_world_model(cfg.model_path, sample_steps=cfg.sample_steps or None,
                                   guidance_scale=cfg.guidance_scale or None)
    meta = json.loads((Path(cfg.model_path) / "world_model.json").read_text())
    games = cfg.games or ((meta.get("game"),) if meta.get("game") else ())
    if not games:
        raise ValueError("EvalConfig.games is empty and the model records no game: name the games")
    model_cols = {"action_mode": world_model.action_mode, "action_encoder": meta["dit"]["action_encoder"],
                  "train_horizon": world_model.horizon, "sample_steps": world_model.sampler.cfg.num_steps,
                  "guidance_scale": world_model.sampler.cfg.guidance_scale}
    out_dir = Path(cfg.run_dir) / "eval" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    lengths, per_frame, fidelity = [], [], []
    with Tracker(cfg.run_dir, cfg.name, tracking_uri=tracking_uri, tags={"job": "eval"}) as tracker:
        # Namespaced: a sweep trial logs its training and evaluation into one run.
        tracker.log_params({"eval": dataclasses.asdict(cfg)})
        tracker.set_tags({"model_path": cfg.model_path})
        for game in games:
            idm_path = ""
            if cfg.action_tests and cfg.idm_steps > 0:
                import ray

                try:
                    idm_path, idm_meta = ray.get(scoring_task(prepare_idm, cfg).remote(
                        cfg.idm_data_root or cfg.data_root, cfg.data_root, game, cfg.idm_steps, cfg.idm_max_pairs,
                        str(Path(cfg.run_dir) / "idm"), cfg.split, "cuda" if cfg.use_gpu else "cpu"))
                except Exception as exc:  # noqa: BLE001 - e.g. a split without frame pairs: Table 2 still runs
                    print(f"[evaluate] {game}: no inverse-dynamics model ({type(exc).__name__}: {exc}); "
                          f"the action tests run without it", flush=True)
                    idm_path, idm_meta = "", {}
                if "eval" in idm_meta:
                    ceiling = idm_meta["eval"]
                    tracker.log_metrics({f"eval/{game}/action/idm_acc_real_split": ceiling["accuracy"],
                                         f"eval/{game}/action/idm_f1_real_split": ceiling["macro_f1"]}, step=0)
                    pd.DataFrame(ceiling["confusion"]).to_csv(out_dir / f"{game}_idm_confusion_real.csv")
            scores, ds = score_game(cfg, game, world_model.n_cond, world_model.trained_horizons, idm_path)
            np.savez_compressed(out_dir / f"{game}_scores.npz", **{k.replace("/", "__"): v for k, v in scores.items()})
            # 95 % intervals over the split's episodes (pipeline/stats.py), beside each mean
            cis = {(r["method"], r["T"]): r for r in pooled_rows([scores], tuple(sorted(cfg.horizons)))}
            ids = scores["episode_id"]
            scores = {k: v for k, v in scores.items() if "/" in k}  # drop the window ids
            for row in horizon_table(scores, tuple(sorted(cfg.horizons))):
                ci = cis[(row["method"], row["generation_length"])]
                row.update({k: ci[k] for k in CI_COLUMNS if k in ci})
                lengths.append({"game": game, **row, **model_cols, "split": cfg.split})
                tracker.log_metrics({f"eval/{game}/{row['method']}/{m}_h{row['generation_length']}": row[m]
                                     for m in (*METRICS, *CI_COLUMNS, "psnr_of_mean_mse") if m in row}, step=0)
            for row in frame_table(scores):
                per_frame.append({"game": game, **row})
            if "idm/label" in scores:  # which actions the generated frames lose: rows true, columns read
                from workers.inverse_dynamics import scores_from_predictions

                lab, gen = scores["idm/label"].reshape(-1), scores["idm/generated"].reshape(-1)
                conf = scores_from_predictions(gen, lab, int(max(lab.max(), gen.max())) + 1)["confusion"]
                conf_df = pd.DataFrame(conf).rename_axis("true_action")
                conf_df.to_csv(out_dir / f"{game}_idm_confusion_generated.csv")
                tracker.log_table(conf_df.reset_index(), f"tables/{game}_idm_confusion_generated.json")
            for row in action_rows([{**scores, "episode_id": ids}], tuple(sorted(cfg.horizons))):
                fidelity.append({"game": game, "split": cfg.split, **row})
                tracker.log_metrics({f"eval/{game}/action/{k}_h{row['T']}": v for k, v in row.items()
                                     if k not in ("T", "seeds")}, step=0)
            # The scores are on disk before any figure is drawn: figures never cost a table.
            tables = {"generation_length": pd.DataFrame(lengths), "per_frame": pd.DataFrame(per_frame)}
            if fidelity:
                tables["action_fidelity"] = pd.DataFrame(fidelity)
            write_tables(out_dir, tables)
            if cfg.figure_windows > 0:
                draw_figures(cfg, world_model.n_cond, ds, game, out_dir, tracker, strip_length=world_model.horizon)
        comparison = paper.vs_paper(tables["generation_length"])
        if len(comparison):  # settings the paper reports: its cells beside ours
            tables["vs_paper"] = comparison
            write_tables(out_dir, {"vs_paper": comparison})
        for name, df in tables.items():
            tracker.log_table(df, f"tables/{name}.json")
        for metric in METRICS:
            if metric in tables["per_frame"]:
                fig = figures.metric_vs_horizon(tables["per_frame"], metric)
                tracker.log_figure(fig, f"figures/{metric}_vs_horizon.png")
                plt.close(fig)
        plt.close("all")
    return tables


if __name__ == "__main__":
    cfg, uri = cli.parse_job(EvalConfig, description=__doc__)
    print(main(cfg, tracking_uri=uri))
