"""Scoring a world model on held-out windows, beside the copy-last-frame baseline.

A window holds L = n + H frames and the action taken at each. The model rolls out H frames from the
first n (chaining chunks past its trained length); every generated frame is scored against the true
one at native 210x160 (MSE on 0-255, PSNR, LPIPS), and so is the last condition frame repeated
(copy-last). One rollout to the longest horizon gives the per-frame scores. The score of a
generation length h is the mean over h frames: of its own rollout of h frames when `direct`
names h (a length the model was trained to generate in one chunk: the paper's Table 2 setting),
else of the first h frames of the long rollout.

`score_windows` works on arrays; `ScoreWindows` is the same as a Ray Data `map_batches` class, so
evaluation runs where the data is and scales with the cluster.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.action_encoder import window_action_slice
from models.metrics import copy_last_prediction, score_frames
from workers.world_model import WorldModel, load_world_model

METHODS = ("model", "copy_last", "vae_recon")
"""Rows of the tables: the world model, the copy-last-frame baseline, and (when scored) the VAE's
reconstruction of the true future frames, the floor under the model's error."""
METRICS = ("mse", "psnr", "lpips")
PSNR_MAX = 100.0
"""PSNR of a frame identical to the truth (MSE 0) is reported as this many dB instead of +inf, so that
means over windows stay finite; copy-last hits it whenever nothing moved."""


def psnr_of_mean_mse(mse: float) -> float:
    """PSNR (dB) of a table row's mean MSE on the 0-255 scale: 10 log10(255^2 / MSE), the table's
    column `psnr_of_mean_mse`. The column `psnr` is the mean over windows of each window's PSNR, which
    unchanged frames (PSNR_MAX) lift; this one weighs every pixel alike, and it is the convention
    that the paper's Table 2 follows (its PSNR equals 10 log10(255^2 / its MSE) within 0.02 dB for
    Breakout and DemonAttack)."""
    return float(10.0 * np.log10(255.0**2 / mse)) if mse > 0 else PSNR_MAX


def window_actions(actions: Tensor, n_cond: int, horizon: int, action_mode: str) -> Tensor:
    """Window actions (B, L), the action at each frame -> the rollout's (B, A): "future" a_t..a_{t+H-1},
    "past_future" a_{t-n+1}..a_{t+H-1}."""
    return actions[:, window_action_slice(n_cond, horizon, action_mode)]


def _scores(pred: Tensor, truth: Tensor, lpips_model) -> dict[str, np.ndarray]:
    s = score_frames(pred, truth, lpips_model)
    s["psnr"] = s["psnr"].clamp(max=PSNR_MAX)
    return {k: v.numpy().astype(np.float64) for k, v in s.items()}  # each (B, H)


ACTION_TESTS = ("recorded", "permuted", "noop")
"""Rollouts of the action-fidelity test (`action_rollouts`): the recorded future actions, the future
actions of a partner window (`partner_keys`), and a constant NOOP (action 0), on the same condition
frames and the same noise."""
NOOP = 0


def partner_keys(keys: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, int]]:
    """A fixed derangement of the scored windows for the "permuted" test: in (episode_id, start_step)
    order, each window takes the actions of the window half the list away, which is never itself
    (two windows or more) and, with windows spread over the episodes, lies in another episode. The
    same windows get the same partners whatever the batching."""
    order = sorted(keys)
    n = len(order)
    return {k: order[(i + max(1, n // 2)) % n] for i, k in enumerate(order)} if n > 1 else {}


def wrong_actions(acts: Tensor, n_future: int, kind: str, partner: Tensor | None = None) -> Tensor:
    """The rollout actions (B, A) with their last `n_future` (the future ones) replaced: "permuted"
    by `partner`'s (B, >= n_future; its last n_future), or without one by those of the previous
    window in the batch; "noop" by NOOP; "recorded" leaves them."""
    out = acts.clone()
    if kind == "permuted":
        out[:, -n_future:] = (partner[:, -n_future:] if partner is not None
                              else torch.roll(acts[:, -n_future:], shifts=1, dims=0))
    elif kind == "noop":
        out[:, -n_future:] = NOOP
    elif kind != "recorded":
        raise ValueError(f"action test {kind!r}; expected one of {ACTION_TESTS}")
    return out


@torch.no_grad()
def action_rollouts(world_model: WorldModel, cond: Tensor, truth: Tensor, acts: Tensor, h: int,
                    generator: torch.Generator | None, idm=None, partner: Tensor | None = None
                    ) -> dict[str, np.ndarray]:
    """The action-fidelity test on one batch: rollouts of `h` frames with the recorded, permuted
    (`partner`'s future actions, `wrong_actions`) and NOOP future actions from the same condition
    frames and the same noise (the generator's state is replayed for each; without a generator one
    seeded 0 is used), scored by MSE and PSNR against the truth: "action_<kind>/mse" (B, h) ...,
    and "action_<kind>/differs" (B, h): whether the action given for generated frame k differs from
    the recorded one (a T-frame difference is taken over the windows whose first T actions differ).
    With an inverse-dynamics model `idm` (`workers.inverse_dynamics`), its reading of each pair of
    the recorded rollout (the frame before, the last condition frame for the first) and of the same
    pairs of true frames: "idm/generated", "idm/real" and the actions given "idm/label", each (B, h).
    Actions outside the model's action set are refused, naming the range."""
    num = getattr(getattr(world_model.dit, "cfg", None), "num_actions", None)
    if num is not None and ((acts >= num) | (acts < -1)).any():
        raise ValueError(f"actions outside the game's action set: valid are 0..{num - 1} (and -1 for none), "
                         f"got {sorted(set(acts[(acts >= num) | (acts < -1)].tolist()))}")
    if generator is None:
        generator = torch.Generator(device=world_model.device if hasattr(world_model, "device") else "cpu")
        generator.manual_seed(0)
    state = generator.get_state()
    out = {}
    for kind in ACTION_TESTS:
        a = wrong_actions(acts, h, kind, partner)
        generator.set_state(state)
        pred = world_model.predict(cond, a, h, generator=generator)
        s = score_frames(pred, truth[:, :h])
        out[f"action_{kind}/mse"] = s["mse"].numpy().astype(np.float64)
        out[f"action_{kind}/psnr"] = s["psnr"].clamp(max=PSNR_MAX).numpy().astype(np.float64)
        out[f"action_{kind}/differs"] = (a[:, -h:] != acts[:, -h:]).numpy()  # (B, h)
        if kind == "recorded" and idm is not None:
            from workers.inverse_dynamics import generated_pairs, idm_predict

            B = len(cond)
            for name, frames in (("generated", pred), ("real", truth[:, :h])):
                prev, nxt, _ = generated_pairs(cond[:, -1], frames)
                out[f"idm/{name}"] = idm_predict(idm, prev, nxt).reshape(B, h)
            out["idm/label"] = acts[:, -h:].numpy().astype(np.int64)
    return out


@torch.no_grad()
def score_windows(world_model: WorldModel, frames: Tensor, actions: Tensor, horizon: int,
                  lpips_model=None, generator: torch.Generator | None = None, direct: tuple[int, ...] = (),
                  vae_recon: bool = False, action_horizon: int = 0, idm=None,
                  partner_actions: Tensor | None = None) -> tuple[dict[str, np.ndarray], Tensor]:
    """frames: uint8 (B, n+H', 210, 160, 3) with H' >= horizon; actions: int64 (B, n+H').

    Returns ({"model/mse": (B, horizon), "copy_last/mse": ..., psnr, lpips when given, and
    "model_T{h}/mse": (B, h) ... for each h < horizon in `direct`, from a rollout of h frames,
    and "vae_recon/mse" ... with `vae_recon`: the VAE's encode-decode of the true frames, and the
    action-fidelity rollouts of `action_horizon` frames when it is > 0 (`action_rollouts`)},
    the generated frames uint8 (B, horizon, 210, 160, 3))."""
    n = world_model.n_cond
    if frames.shape[1] < n + horizon or actions.shape[:2] != frames.shape[:2]:
        raise ValueError(f"windows of {frames.shape[1]} frames / actions {tuple(actions.shape)} cannot "
                         f"score horizon {horizon} after {n} condition frames")
    cond, truth = frames[:, :n], frames[:, n: n + horizon]  # (B, n, ...), (B, H, ...)
    acts = window_actions(actions, n, horizon, world_model.action_mode)
    pred = world_model.predict(cond, acts, horizon, generator=generator)  # (B, H, ...) uint8
    out = {}
    guesses = [("model", pred), ("copy_last", copy_last_prediction(cond, horizon))]
    if vae_recon:
        guesses.append(("vae_recon", world_model.reconstruct(truth)))
    for method, guess in guesses:
        for k, v in _scores(guess, truth, lpips_model).items():
            out[f"{method}/{k}"] = v
    for h in sorted(set(direct)):
        if h < horizon:
            pred_h = world_model.predict(cond, window_actions(actions, n, h, world_model.action_mode), h,
                                         generator=generator)  # (B, h, ...)
            for k, v in _scores(pred_h, truth[:, :h], lpips_model).items():
                out[f"model_T{h}/{k}"] = v
    if action_horizon > 0:
        h = min(action_horizon, horizon)
        partner = (window_actions(partner_actions, n, h, world_model.action_mode)
                   if partner_actions is not None else None)
        out.update(action_rollouts(world_model, cond, truth, window_actions(actions, n, h, world_model.action_mode),
                                   h, generator, idm, partner))
    return out, pred


class ScoreWindows:
    """Ray Data `map_batches` class: loads the world model (and LPIPS) once per actor, then turns
    batches of windows into per-window, per-frame scores: columns "model/mse" (B, H) etc., plus
    `episode_id`/`start_step` when the batch carries them."""

    def __init__(self, model_path: str, horizon: int, *, lpips: bool = True, sample_steps: int | None = None,
                 seed: int = 0, device: str = "cpu", direct: tuple[int, ...] = (), vae_recon: bool = False,
                 action_horizon: int = 0, guidance_scale: float | None = None, idm_path: str = "",
                 partner_actions: dict | None = None):
        self.world_model = load_world_model(model_path, device, sample_steps=sample_steps,
                                            guidance_scale=guidance_scale)
        self.idm = None
        if idm_path:
            from workers.inverse_dynamics import load_idm

            self.idm = load_idm(idm_path, device)[0]
        self.horizon, self.direct, self.vae_recon = horizon, tuple(direct), vae_recon
        self.action_horizon = action_horizon
        # {(episode_id, start_step): the partner window's actions (L,)}: the "permuted" test's actions
        self.partner_actions = partner_actions or {}
        self.lpips_model = None
        if lpips:
            from models.lpips import LPIPS

            self.lpips_model = LPIPS().to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        frames = torch.from_numpy(np.ascontiguousarray(np.stack(batch["frames"])))
        actions = torch.from_numpy(np.stack(batch["actions"]).astype(np.int64))
        partner = None
        if self.partner_actions and "episode_id" in batch and "start_step" in batch:
            partner = torch.from_numpy(np.stack([
                self.partner_actions[(str(e), int(t))] for e, t in zip(batch["episode_id"], batch["start_step"])
            ]).astype(np.int64))
        scores, _ = score_windows(self.world_model, frames, actions, self.horizon, self.lpips_model,
                                  self.generator, self.direct, self.vae_recon, self.action_horizon, self.idm,
                                  partner)
        if "episode_id" in batch:
            scores["episode_id"] = np.asarray(batch["episode_id"]).astype(str)
        if "start_step" in batch:
            scores["start_step"] = np.asarray(batch["start_step"], dtype=np.int64)
        return scores


def window_scores(scores: dict[str, np.ndarray], method: str, metric: str, h: int) -> tuple[np.ndarray, str] | None:
    """One number per window: `metric` of `method` averaged over generated frames 1..h (the paper's
    Table 2 cell for T = h), from the model's own h-frame rollout where scores hold one
    ("model_T{h}/..."; rollout "direct"), else from the first h frames of the long rollout
    ("prefix"). None where the scores lack the metric."""
    own = method == "model" and f"model_T{h}/{metric}" in scores
    key = f"model_T{h}/{metric}" if own else f"{method}/{metric}"
    if key not in scores:
        return None
    return scores[key][:, :h].mean(axis=1), "direct" if own else "prefix"  # (N,)


def horizon_table(scores: dict[str, np.ndarray], horizons: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per-window per-frame scores -> rows {method, generation_length, rollout, metric mean/std over
    windows} (`window_scores`)."""
    rows = []
    for method in (m for m in METHODS if f"{m}/mse" in scores):
        for h in horizons:
            row: dict[str, Any] = {"method": method, "generation_length": h,
                                   "rollout": "direct" if method == "model" and f"model_T{h}/mse" in scores else "prefix"}
            for metric in METRICS:
                got = window_scores(scores, method, metric, h)
                if got is None:
                    continue
                per_window = got[0]
                row[metric] = float(per_window.mean())
                row[f"{metric}_std"] = float(per_window.std())
            row["psnr_of_mean_mse"] = psnr_of_mean_mse(row["mse"])
            row["num_windows"] = int(scores[f"{method}/mse"].shape[0])
            rows.append(row)
    return rows


IDM_FRAME_COLUMNS = ("idm_acc_generated", "idm_acc_real", "idm_f1_generated", "idm_f1_real", "idm_acc_ratio")
"""Per-frame inverse-dynamics columns of `frame_table`'s model rows (see there)."""


def idm_frame_scores(scores: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """The inverse-dynamics readings of generated frame k (0-based) of the action test's recorded
    rollout (`action_rollouts`: "idm/generated", "idm/real", "idm/label"): accuracy and macro-F1 on
    the generated pair (frame k and the one before it, the last condition frame for k = 0) and on the
    same windows' true pair, and the plain ratio acc_generated / acc_real. Empty where the scores
    hold no such reading (no inverse-dynamics model, or k past the action test's length)."""
    if "idm/label" not in scores or k >= scores["idm/label"].shape[1]:
        return {}
    from workers.inverse_dynamics import scores_from_predictions

    label = np.asarray(scores["idm/label"][:, k], np.int64)
    out: dict[str, float] = {}
    for name in ("generated", "real"):
        pred = np.asarray(scores[f"idm/{name}"][:, k], np.int64)
        s = scores_from_predictions(pred, label, int(max(label.max(), pred.max())) + 1)
        out[f"idm_acc_{name}"], out[f"idm_f1_{name}"] = s["accuracy"], s["macro_f1"]
    real = out["idm_acc_real"]
    out["idm_acc_ratio"] = out["idm_acc_generated"] / real if real > 0 else float("nan")
    return out


def frame_table(scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-window per-frame scores -> rows {method, frame (1-based), metric mean/std over windows}.
    With inverse-dynamics readings (`action_rollouts`), the model's rows of frames 1..T of the action
    test also carry `IDM_FRAME_COLUMNS` (`idm_frame_scores`): read on the action test's recorded
    rollout of T frames (the model's trained length) and on the true frames of the same windows,
    the same predictions whose means over frames 1..T are the action_fidelity table's idm_* columns."""
    rows = []
    for method in (m for m in METHODS if f"{m}/mse" in scores):
        H = scores[f"{method}/mse"].shape[1]
        for k in range(H):
            row: dict[str, Any] = {"method": method, "frame": k + 1}
            for metric in METRICS:
                key = f"{method}/{metric}"
                if key in scores:
                    row[metric] = float(scores[key][:, k].mean())
                    row[f"{metric}_std"] = float(scores[key][:, k].std())
            row["psnr_of_mean_mse"] = psnr_of_mean_mse(row["mse"])
            if method == "model":
                row.update(idm_frame_scores(scores, k))
            rows.append(row)
    return rows
