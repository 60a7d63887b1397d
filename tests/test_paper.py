"""The paper's published cells where the code sets them beside ours: the results tables (Tables 2-4,
`pipeline/results.py`) and the comparison table evaluation writes (`vs_paper`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.paper import vs_paper
from pipeline.results import PAPER_METHOD, ablation_table, table2
from workers.evaluate import horizon_table


def _scores(rng, level: float) -> dict[str, np.ndarray]:
    """One evaluation's scores (`<game>_scores.npz`): 4 episodes x 3 windows x 4 frames."""
    out = {"episode_id": np.repeat([f"g.e{i}~1.a" for i in range(4)], 3), "start_step": np.tile([0, 8, 16], 4)}
    for method, scale in (("model", 1.0), ("copy_last", 2.0), ("vae_recon", 0.1)):
        mse = level * scale * rng.uniform(0.5, 1.5, (12, 4))
        out[f"{method}/mse"], out[f"{method}/psnr"] = mse, 10 * np.log10(255.0**2 / mse)
        out[f"{method}/lpips"] = mse / 1000
    return out


def _paper_rows(df: pd.DataFrame, by: list[str]) -> dict[tuple, tuple[float, float, float]]:
    rows = df[df.method == PAPER_METHOD]
    assert not rows.duplicated(by).any(), rows
    return {tuple(r[by]): (r.mse, r.psnr_of_mean_mse, r.lpips) for _, r in rows.iterrows()}


def test_table2_sets_each_game_and_length_beside_the_papers_own_cell():
    """Table 2 (pipeline/results.py) looks the paper's cells up by game and T with future actions
    and the learned embedding: each (game, T) gets its own row of the paper, none for a game or a T
    the paper lacks. The expected cells are the paper's Table 2 as printed: a wrong key (another
    game, T, mode or encoder; a value of another cell) gives another number or no row."""
    rng = np.random.default_rng(0)
    pooled = [({"game": g}, _scores(rng, 10.0)) for g in ("Seaquest", "DemonAttack", "Pong", "Breakout") for _ in range(3)]
    df = table2(pooled, n_boot=20)
    got = _paper_rows(df, ["game", "T"])
    assert set(got) == {(g, T) for g in ("Breakout", "Pong", "DemonAttack") for T in (1, 2, 4)}
    assert got[("Breakout", 1)] == (13.1859, 36.9485, 0.0132)
    assert got[("Breakout", 4)] == (14.3638, 36.5727, 0.0662)
    assert got[("Pong", 2)] == (12.4529, 37.3184, 0.0217)
    assert got[("DemonAttack", 4)] == (5.1662, 41.0179, 0.0670)
    # the paper's row closes each (game, T) block, after ours, in the paper's order of games
    assert list(df.game.drop_duplicates()) == ["Breakout", "Pong", "DemonAttack", "Seaquest"]
    block = df[(df.game == "Pong") & (df["T"] == 2)]
    assert list(block.method) == ["model", "copy_last", "vae_recon", PAPER_METHOD]
    assert not df[df.method == PAPER_METHOD].reported.any()  # the paper's cells are no result of ours


def _trial(game: str, mode: str, encoder: str, seed: int, scores: dict) -> tuple[dict, dict]:
    meta = {"game": game, "seed": seed, "run_id": f"{game}-{mode}-{encoder}-s{seed}", "preset_version": "v0",
            "horizons": [1, 2, 4], "variant": {"action_mode": mode, "action_encoder": encoder},
            "sweep": {"fields": ["action_mode", "action_encoder"]}}
    return meta, scores


def test_ablation_tables_take_the_papers_cell_of_each_variant():
    """Tables 3 and 4 look the paper's cells up by (game, action_mode, action_encoder, T), the
    varied setting taking the variant's value and the held one the reference's: Table 3's past +
    future row is the paper's Table 3, its future row Table 2's; Table 4's one-hot row is the paper's
    Table 4. A game the paper did not ablate (Pong) gets Table 2's cell for its reference variant only."""
    rng = np.random.default_rng(1)
    pooled = []
    for game in ("Breakout", "Pong"):
        for seed in range(3):
            for mode, encoder in (("future", "embedding"), ("past_future", "embedding"), ("future", "onehot")):
                pooled.append(_trial(game, mode, encoder, seed, _scores(rng, 10.0)))
    t3, _ = ablation_table(pooled, "table3", n_boot=20)
    t4, _ = ablation_table(pooled, "table4", n_boot=20)
    got3, got4 = _paper_rows(t3, ["game", "T", "variant"]), _paper_rows(t4, ["game", "T", "variant"])
    reference = {("Pong", T, v) for T in (1, 2, 4) for v in ("future", "embedding")}
    assert set(got3) == {("Breakout", T, v) for T in (1, 2, 4) for v in ("future", "past_future")} | {
        k for k in reference if k[2] == "future"}
    assert set(got4) == {("Breakout", T, v) for T in (1, 2, 4) for v in ("embedding", "onehot")} | {
        k for k in reference if k[2] == "embedding"}
    assert got3[("Breakout", 2, "past_future")] == (13.2152, 36.6384, 0.0376)  # Table 3
    assert got3[("Breakout", 4, "past_future")] == (14.5893, 36.1825, 0.0554)
    assert got3[("Breakout", 2, "future")] == got4[("Breakout", 2, "embedding")] == (13.3697, 36.8881, 0.0356)
    assert got4[("Breakout", 1, "onehot")] == (13.2162, 36.7846, 0.0141)  # Table 4
    assert got4[("Breakout", 4, "onehot")] == (14.9298, 36.2293, 0.0698)
    assert got3[("Pong", 4, "future")] == got4[("Pong", 4, "embedding")] == (12.9572, 37.8253, 0.0390)  # Table 2


def _table(game: str, mode: str, encoder: str) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    scores = {}
    for method, level in (("model", 10.0), ("copy_last", 20.0)):
        mse = rng.uniform(0.5, 1.5, (6, 8)) * level
        scores[f"{method}/mse"] = mse
        scores[f"{method}/psnr"] = 10 * np.log10(255.0**2 / mse)
    rows = horizon_table(scores, (1, 2, 4, 8))
    return pd.DataFrame([{"game": game, **r, "action_mode": mode, "action_encoder": encoder} for r in rows])


def test_vs_paper_sets_our_rows_beside_the_papers():
    t = _table("Breakout", "future", "embedding")
    out = vs_paper(t)
    assert list(out.generation_length) == [1, 2, 4]  # the paper has no T = 8
    row = out[out.generation_length == 4].iloc[0]
    ours = t[(t.method == "model") & (t.generation_length == 4)].iloc[0]
    copy = t[(t.method == "copy_last") & (t.generation_length == 4)].iloc[0]
    assert row.mse == ours.mse and row.paper_mse == 14.3638 and row.paper_psnr == 36.5727
    assert row.psnr_of_mean_mse == pytest.approx(10 * math.log10(255.0**2 / ours.mse))
    assert row.db_over_copy_last == pytest.approx(ours.psnr_of_mean_mse - copy.psnr_of_mean_mse)
    assert row.db_over_copy_last > 0  # the model's MSE level is half copy-last's here
    assert vs_paper(_table("Breakout", "future", "onehot")).paper_mse.tolist() == [13.2162, 13.8342, 14.9298]
    assert vs_paper(_table("Pong", "past_future", "embedding")).empty  # not in the paper
    with pytest.raises(ValueError, match="psnr_of_mean_mse"):
        vs_paper(t.drop(columns=["psnr_of_mean_mse"]))
