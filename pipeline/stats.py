"""Confidence intervals over held-out episodes, and pairing by window key.

Windows of one episode are correlated (they overlap, and share a game's state), so a bootstrap that
resamples windows alone understates the spread. `EpisodeBootstrap` resamples *episodes* with
replacement, and every window of a drawn episode comes with it. Several training seeds are pooled:
each seed's mean is taken on the same resampled episodes wherever the seeds' evaluations read the
same episodes (runs that share any episode are drawn from one resample of all their episodes), and on
its own collection's resample otherwise (a stratified bootstrap, one stratum per collection). Episodes are told apart by their position in the collection
(`workers.schema.episode_position`), not by their whole id: a separate job that collects with the
same settings records the same games at the same positions under ids that differ after "~", and
resampling those copies independently would count the held-out games twice and narrow the interval
by about the square root of the number of such jobs. A statistic of several methods (a difference, a
ratio of means) is computed on the same draws, so it is paired.

Within one evaluation every method is scored on the same windows, row by row. Scores of two
separate evaluations are lined up by window key (episode_id, start_step), never by row order:
`align` refuses two score sets whose keys differ, so no method loses windows alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.schema import episode_position

CI_LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    low: float
    high: float


def window_keys(episode_id, start_step) -> list[tuple[str, int]]:
    """(episode_id, start_step) of each window, as plain Python values."""
    return [(str(e), int(s)) for e, s in zip(episode_id, start_step)]


def align(keys_a: list[tuple[str, int]], keys_b: list[tuple[str, int]], what: str = "scores") -> np.ndarray:
    """Index into b of each of a's windows (`b[idx]` lines b up with a). The key sets must be equal:
    pairing never drops a window of one side."""
    if len(set(keys_a)) != len(keys_a) or len(set(keys_b)) != len(keys_b):
        raise ValueError(f"{what}: a window key (episode_id, start_step) appears twice")
    pos = {k: i for i, k in enumerate(keys_b)}
    missing = [k for k in keys_a if k not in pos]
    extra = len(keys_b) - (len(keys_a) - len(missing))
    if missing or extra:
        raise ValueError(f"{what}: the two score sets hold different windows ({len(missing)} only in the first, "
                         f"{extra} only in the second; e.g. {missing[:2]}): compare on the same windows")
    return np.array([pos[k] for k in keys_a], dtype=np.int64)


class EpisodeBootstrap:
    """Episode resamples for S runs (seeds), each scored on windows of held-out episodes.

    `episode_ids[r]` is the episode of each of run r's windows. Runs whose episode positions
    (`episode_position`) overlap, even in part, form one group; each resample draws, with
    replacement, as many positions as the group holds from the union of its positions, and every run
    of the group reads its own positions' counts from that one draw. A game that several runs
    scored is thus drawn once for all of them, never independently per run (which would narrow the
    interval as if the runs had seen different games). Groups that share no position are drawn
    independently: a stratified bootstrap, one stratum per collection. (Where two collections of
    the same settings recorded different games at a position, the shared draw keeps those games
    together: an interval about as wide as independent draws would give, or wider.) A run none of
    whose positions a resample draws (possible only where its positions are a small part of its
    group's) gives a NaN replicate there, and so a NaN interval, not a silent one."""

    def __init__(self, episode_ids: list[np.ndarray], n_boot: int = N_BOOT, seed: int = 0):
        if not episode_ids or any(len(e) == 0 for e in episode_ids):
            raise ValueError("EpisodeBootstrap: every run needs at least one window")
        rng = np.random.default_rng(seed)
        positions = [np.array([episode_position(e) for e in np.asarray(eids).astype(str)]) for eids in episode_ids]
        sets = [set(p.tolist()) for p in positions]
        group = list(range(len(sets)))  # union-find over runs that share a position

        def root(i: int) -> int:
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        for i in range(len(sets)):
            for j in range(i):
                if sets[i] & sets[j]:
                    group[root(i)] = root(j)
        draws: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # group -> (its positions, counts (B, E))
        for g in sorted({root(i) for i in range(len(sets))}):
            names = np.array(sorted(set().union(*(sets[i] for i in range(len(sets)) if root(i) == g))))
            # each resample draws E positions with replacement: how often each one is drawn
            draws[g] = names, rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)),
                                              size=n_boot).astype(np.float64)
        self._runs = []  # per run: (window -> position column of its group, counts (B, E))
        for i, pos in enumerate(positions):
            names, counts = draws[root(i)]
            self._runs.append((np.searchsorted(names, pos), counts))
        self.episodes = [len(s) for s in sets]
        """Held-out episodes (positions) of each run."""

    def run_means(self, values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """values[r]: one number per window of run r -> (each run's mean (S,), its bootstrap
        replicates (B, S))."""
        if len(values) != len(self._runs):
            raise ValueError(f"EpisodeBootstrap: {len(values)} value arrays for {len(self._runs)} runs")
        point, boot = [], []
        for v, (inverse, counts) in zip(values, self._runs):
            v = np.asarray(v, dtype=np.float64)
            if v.shape != inverse.shape:
                raise ValueError(f"EpisodeBootstrap: {v.shape[0]} values for {inverse.shape[0]} windows")
            E = counts.shape[1]
            sums = np.bincount(inverse, weights=v, minlength=E)
            ns = np.bincount(inverse, minlength=E).astype(np.float64)
            point.append(v.mean())
            with np.errstate(invalid="ignore", divide="ignore"):  # no window of this run drawn: NaN
                boot.append((counts @ sums) / (counts @ ns))
        return np.array(point), np.stack(boot, axis=1)

    def mean(self, values: list[np.ndarray]) -> tuple[Interval, np.ndarray]:
        """The mean over runs of each run's window mean, its interval, and its replicates (B,)."""
        point, boot = self.run_means(values)
        reps = boot.mean(axis=1)
        return interval(point.mean(), reps), reps


# Student's t, 97.5 % quantile, for 1..30 degrees of freedom (the 95 % interval over seed means).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def stratified_mean_resamples(groups: list[np.ndarray], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot,) resampled means over groups of each group's mean, the values resampled within each
    group (one group: the plain bootstrap of a mean); e.g. real-game returns, games within seeds."""
    out = np.zeros(n_boot)
    for x in groups:
        x = np.asarray(x, np.float64)
        counts = rng.multinomial(len(x), np.full(len(x), 1.0 / len(x)), size=n_boot)
        out += counts @ x / len(x)
    return out / len(groups)


def seed_interval(seed_means: np.ndarray) -> Interval:
    """95 % t-interval of the mean over training seeds from the seeds' own means: what another set of
    seeds would give on these episodes (NaN bounds with one seed)."""
    x = np.asarray(seed_means, dtype=np.float64)
    if len(x) < 2:
        return Interval(float(x.mean()), float("nan"), float("nan"))
    df = len(x) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * x.std(ddof=1) / np.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half))


def interval(value: float, replicates: np.ndarray, level: float = CI_LEVEL) -> Interval:
    """Percentile interval of bootstrap replicates around a point estimate."""
    a = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        lo, hi = np.quantile(replicates, [a, 1.0 - a])
    return Interval(float(value), float(lo), float(hi))


def db_ratio(mse_reference, mse_model):
    """dB gained over a reference: PSNR(model) - PSNR(reference) of mean MSEs (inf or NaN where a mean
    is 0, e.g. copy-last on windows where nothing moved: undefined, not dropped)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(np.asarray(mse_reference, dtype=np.float64) / np.asarray(mse_model, dtype=np.float64))


def pooled_rows(runs: list[dict[str, np.ndarray]], horizons: tuple[int, ...], n_boot: int = N_BOOT,
                seed: int = 0) -> list[dict]:
    """Table 2 rows pooled over runs (training seeds) of one game: for each generation length T and
    method, each metric's mean over seeds of the per-window mean over frames 1..T, its 95 % episode
    bootstrap interval and the seed-to-seed std; the PSNR of the mean MSE; and the dB over copy-last
    (paired: the same resampled windows) with its interval. `runs[r]` is an evaluation's scores
    (`<game>_scores.npz`: `<method>/<metric>` arrays (N, frames), `episode_id`, `start_step`)."""
    from workers.evaluate import METHODS, METRICS, psnr_of_mean_mse, window_scores

    for i, r in enumerate(runs):
        if "episode_id" not in r or "start_step" not in r:
            raise ValueError(f"scores of run {i} hold no window keys (episode_id, start_step)")
    boot = EpisodeBootstrap([r["episode_id"] for r in runs], n_boot=n_boot, seed=seed)
    S = len(runs)
    rows = []
    for h in horizons:
        copy_pt, copy_b = boot.run_means([window_scores(r, "copy_last", "mse", h)[0] for r in runs])
        for method in METHODS:
            if not all(f"{method}/mse" in r for r in runs):
                continue
            row = {"method": method, "T": h, "seeds": S,
                   "windows": int(round(np.mean([len(r["episode_id"]) for r in runs]))),
                   "episodes": int(round(np.mean(boot.episodes)))}
            for metric in METRICS:
                got = [window_scores(r, method, metric, h) for r in runs]
                if any(g is None for g in got):
                    continue
                pt, b = boot.run_means([g[0] for g in got])
                ci = interval(pt.mean(), b.mean(axis=1))
                row.update({metric: ci.value, f"{metric}_ci_low": ci.low, f"{metric}_ci_high": ci.high,
                            f"{metric}_std_seeds": float(pt.std(ddof=1)) if S > 1 else float("nan")})
                if metric == "mse":
                    si = seed_interval(pt)
                    row.update({"mse_seed_ci_low": si.low, "mse_seed_ci_high": si.high})
                if metric == "mse":
                    row["psnr_of_mean_mse"] = psnr_of_mean_mse(ci.value)
                    db = interval(db_ratio(copy_pt.mean(), pt.mean()), db_ratio(copy_b.mean(axis=1), b.mean(axis=1)))
                    row.update({"db_over_copy_last": db.value, "db_ci_low": db.low, "db_ci_high": db.high})
            row["rollout"] = window_scores(runs[0], method, "mse", h)[1]
            rows.append(row)
    return rows


def action_rows(runs: list[dict[str, np.ndarray]], horizons: tuple[int, ...], n_boot: int = N_BOOT,
                seed: int = 0) -> list[dict]:
    """Action fidelity pooled over runs: for each T (mean over generated frames 1..T of the
    action-fidelity rollouts, `workers.evaluate.action_rollouts`), PSNR(recorded) - PSNR(permuted)
    and PSNR(recorded) - PSNR(NOOP) of the mean MSEs over the windows whose first T actions differ
    (the same windows for both sides of each difference), each with its paired 95 % episode-bootstrap
    interval, and the share of those windows where the recorded actions give the lower MSE. Runs
    with no such window leave that difference (`seeds_<kind>` counts the runs used). A model that
    follows its actions scores clearly above 0. Beside each difference (kind = permuted, noop), on
    its own windows: `mse_<kind>` and `mse_recorded_vs_<kind>` (mean over seeds of each seed's window
    mean), their `psnr_of_mean_mse_<kind>` and `psnr_of_mean_mse_recorded_vs_<kind>` (so the
    difference is psnr_of_mean_mse_recorded_vs_<kind> - psnr_of_mean_mse_<kind>), and
    `windows_<kind>` (windows per seed). The inverse-dynamics columns are `idm_columns`'."""
    from workers.evaluate import psnr_of_mean_mse

    if not all("action_recorded/mse" in r for r in runs):
        return []
    h_f = min(r["action_recorded/mse"].shape[1] for r in runs)
    rows = []
    for T in (t for t in horizons if t <= h_f):
        row: dict = {"T": T, "seeds": len(runs)}
        for kind, col in (("permuted", "dpsnr_vs_permuted"), ("noop", "dpsnr_vs_noop")):
            used = []
            for r in runs:
                differs = np.asarray(r[f"action_{kind}/differs"]).astype(bool)
                keep = differs[:, :T].any(axis=1) if differs.ndim == 2 else differs
                if keep.any():
                    used.append((r, keep))
            if not used:
                continue
            boot = EpisodeBootstrap([r["episode_id"][k] for r, k in used], n_boot=n_boot, seed=seed)
            rec = [r["action_recorded/mse"][k, :T].mean(axis=1) for r, k in used]
            wrong = [r[f"action_{kind}/mse"][k, :T].mean(axis=1) for r, k in used]
            rp, rb = boot.run_means(rec)
            wp, wb = boot.run_means(wrong)
            d = interval(db_ratio(wp.mean(), rp.mean()), db_ratio(wb.mean(axis=1), rb.mean(axis=1)))
            short = "perm" if kind == "permuted" else "noop"
            row.update({col: d.value, f"dpsnr_{short}_ci_low": d.low, f"dpsnr_{short}_ci_high": d.high,
                        f"mse_{kind}": float(wp.mean()), f"mse_recorded_vs_{kind}": float(rp.mean()),
                        f"psnr_of_mean_mse_{kind}": psnr_of_mean_mse(float(wp.mean())),
                        f"psnr_of_mean_mse_recorded_vs_{kind}": psnr_of_mean_mse(float(rp.mean())),
                        f"recorded_better_{kind}": float(np.mean(np.concatenate(rec) < np.concatenate(wrong))),
                        f"windows_{kind}": int(round(np.mean([k.sum() for _, k in used]))),
                        f"seeds_{kind}": len(used)})
        if all("idm/label" in r for r in runs):
            row.update(idm_columns(runs, T))
        rows.append(row)
    return rows


def idm_columns(runs: list[dict[str, np.ndarray]], T: int) -> dict:
    """The inverse-dynamics model's accuracy and macro-F1 over generated frames 1..T of the recorded
    rollouts ("idm/generated") and over the same pairs of true frames ("idm/real", the ceiling on
    these windows), pooled over runs; the majority share of the actions given (what a constant guess
    scores); and two ratios of generated to real accuracy:

    - `idm_acc_ratio`: the plain ratio acc_generated / acc_real, the action target ("accuracy on
      generated frames >= 90 % of its accuracy on real frames"): 1 when the generated frames carry
      the actions as well as the true ones; a model that ignores its actions still scores about
      majority / acc_real here, not 0.
    - `idm_kappa_ratio`: the chance-corrected ratio (acc_generated - majority) / (acc_real -
      majority): 1 as above, 0 when no better than a constant guess (NaN when the real accuracy is
      no better than the guess either)."""
    from workers.inverse_dynamics import scores_from_predictions

    label = np.concatenate([r["idm/label"][:, :T].reshape(-1) for r in runs])
    out = {}
    for name in ("real", "generated"):
        pred = np.concatenate([r[f"idm/{name}"][:, :T].reshape(-1) for r in runs])
        s = scores_from_predictions(pred, label, int(max(label.max(), pred.max())) + 1)
        out.update({f"idm_acc_{name}": s["accuracy"], f"idm_f1_{name}": s["macro_f1"]})
        out["idm_majority_share"] = s["majority_share"]
    real = out["idm_acc_real"]
    out["idm_acc_ratio"] = out["idm_acc_generated"] / real if real > 0 else float("nan")
    gain = real - out["idm_majority_share"]
    out["idm_kappa_ratio"] = (out["idm_acc_generated"] - out["idm_majority_share"]) / gain if gain > 0 else float("nan")
    return out
