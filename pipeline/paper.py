"""The paper's published scores, beside ours.

`PAPER` holds Tables 2-4 of the paper (MSE on 0-255, PSNR in dB, LPIPS), keyed by (game,
action_mode, action_encoder, generation length T): Table 2 is every game with future actions and
the learned embedding; Table 3 adds Breakout with past + future actions; Table 4 adds Breakout with
one-hot actions. The paper's PSNR follows the PSNR of its mean MSE (10 log10(255^2 / MSE)
reproduces Table 2's Breakout and DemonAttack cells within 0.03 dB; Pong's and Tables 3-4's are
0.01-0.8 dB apart), so the comparison sets it against our `psnr_of_mean_mse`, and shows our mean of
per-window PSNRs beside it.
"""

from __future__ import annotations

import pandas as pd

PAPER: dict[tuple[str, str, str, int], tuple[float, float, float]] = {
    # Table 2: future actions, learned embedding.
    ("Breakout", "future", "embedding", 1): (13.1859, 36.9485, 0.0132),
    ("Breakout", "future", "embedding", 2): (13.3697, 36.8881, 0.0356),
    ("Breakout", "future", "embedding", 4): (14.3638, 36.5727, 0.0662),
    ("Pong", "future", "embedding", 1): (12.2973, 37.4956, 0.0122),
    ("Pong", "future", "embedding", 2): (12.4529, 37.3184, 0.0217),
    ("Pong", "future", "embedding", 4): (12.9572, 37.8253, 0.0390),
    ("DemonAttack", "future", "embedding", 1): (4.6977, 41.4244, 0.0558),
    ("DemonAttack", "future", "embedding", 2): (5.0467, 41.1289, 0.0665),
    ("DemonAttack", "future", "embedding", 4): (5.1662, 41.0179, 0.0670),
    # Table 3: Breakout, past + future actions.
    ("Breakout", "past_future", "embedding", 1): (13.2076, 36.7749, 0.0145),
    ("Breakout", "past_future", "embedding", 2): (13.2152, 36.6384, 0.0376),
    ("Breakout", "past_future", "embedding", 4): (14.5893, 36.1825, 0.0554),
    # Table 4: Breakout, one-hot actions.
    ("Breakout", "future", "onehot", 1): (13.2162, 36.7846, 0.0141),
    ("Breakout", "future", "onehot", 2): (13.8342, 36.7308, 0.0190),
    ("Breakout", "future", "onehot", 4): (14.9298, 36.2293, 0.0698),
}

COLUMNS = ["game", "action_mode", "action_encoder", "generation_length", "rollout", "num_windows",
           "mse", "paper_mse", "psnr_of_mean_mse", "paper_psnr", "psnr", "lpips", "paper_lpips",
           "copy_last_mse", "copy_last_psnr_of_mean_mse", "db_over_copy_last"]


def vs_paper(generation_length: pd.DataFrame) -> pd.DataFrame:
    """Rows of an evaluation's `generation_length` table (columns game, method, generation_length,
    action_mode, action_encoder, mse, psnr, psnr_of_mean_mse, lpips, ...) -> one row per model
    setting that the paper reports, with the paper's cells and the copy-last baseline on the same
    windows beside ours (`db_over_copy_last`: our psnr_of_mean_mse minus copy-last's). Settings
    the paper does not report give no row."""
    df = generation_length
    need = {"game", "method", "generation_length", "action_mode", "action_encoder", "mse", "psnr_of_mean_mse"}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"vs_paper: the generation_length table lacks columns {sorted(missing)}")
    copy_last = {(r.game, int(r.generation_length)): r for r in df[df.method == "copy_last"].itertuples()}
    rows = []
    for r in df[df.method == "model"].itertuples():
        key = (r.game, r.action_mode, r.action_encoder, int(r.generation_length))
        if key not in PAPER:
            continue
        p_mse, p_psnr, p_lpips = PAPER[key]
        c = copy_last.get((r.game, int(r.generation_length)))
        rows.append({
            "game": r.game, "action_mode": r.action_mode, "action_encoder": r.action_encoder,
            "generation_length": int(r.generation_length), "rollout": getattr(r, "rollout", ""),
            "num_windows": getattr(r, "num_windows", None),
            "mse": r.mse, "paper_mse": p_mse, "psnr_of_mean_mse": r.psnr_of_mean_mse, "paper_psnr": p_psnr,
            "psnr": getattr(r, "psnr", float("nan")), "lpips": getattr(r, "lpips", float("nan")), "paper_lpips": p_lpips,
            "copy_last_mse": c.mse if c is not None else float("nan"),
            "copy_last_psnr_of_mean_mse": c.psnr_of_mean_mse if c is not None else float("nan"),
            "db_over_copy_last": r.psnr_of_mean_mse - c.psnr_of_mean_mse if c is not None else float("nan"),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


PUBLISHED_RETURNS: dict[tuple[str, str], float] = {
    # Agents trained in a world model on Atari 100k (100k real agent steps, sticky actions, full
    # games), as their papers publish them: another protocol than the imagine stage's, shown beside
    # it, never pooled with it. Each is the mean, to one decimal, over the paper's 5 training seeds
    # of the per-seed returns its authors publish as the paper's results (the files cited below:
    # taken from those files, not read off the papers' PDF tables).
    #
    # DIAMOND: "Diffusion for World Modeling: Visual Details Matter in Atari" (Alonso et al., NeurIPS
    # 2024), Atari 100k returns; per-seed returns in github.com/eloialonso/diamond
    # results/data/DIAMOND.json (commit 5bcd159), which its README says "contains the results for each
    # game and seed used in the paper": Breakout 124.0, 148.8, 81.0, 108.0, 200.6; Pong 19.3, 20.9,
    # 20.9, 20.7, 20.0; DemonAttack 245.4, 107.3, 295.7, 329.9, 462.3.
    ("Breakout", "DIAMOND (Atari 100k)"): 132.5,
    ("Pong", "DIAMOND (Atari 100k)"): 20.4,
    ("DemonAttack", "DIAMOND (Atari 100k)"): 288.1,
    # IRIS: "Transformers are Sample-Efficient World Models" (Micheli et al., ICLR 2023), Atari 100k
    # returns; per-seed returns in github.com/eloialonso/iris results/data/IRIS.json
    # (commit 24326aa; README: "raw scores (for each game, and for each training run) for IRIS and the
    # baselines"): Breakout 104.6, 85.6, 69.7, 70.3, 88.1; Pong 19.3, 18.5, 16.6, 6.2, 12.4;
    # DemonAttack 905, 2011.9, 2888.5, 2613.4, 1753.
    ("Breakout", "IRIS (Atari 100k)"): 83.7,
    ("Pong", "IRIS (Atari 100k)"): 14.6,
    ("DemonAttack", "IRIS (Atari 100k)"): 2034.4,
    # The reference scores of human-normalised Atari results (the same values are in
    # eloialonso/iris results/data/RANDOM.json and HUMAN.json).
    ("Breakout", "random (Atari reference)"): 1.7,
    ("Breakout", "human (Atari reference)"): 30.5,
    ("Pong", "random (Atari reference)"): -20.7,
    ("Pong", "human (Atari reference)"): 14.6,
    ("DemonAttack", "random (Atari reference)"): 152.1,
    ("DemonAttack", "human (Atari reference)"): 1971.0,
}
