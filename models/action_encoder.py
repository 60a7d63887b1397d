"""Action encoder: discrete actions -> one cross-attention token per action (paper, appendix B).

`"embedding"`: learned embedding -> Linear -> ReLU -> Linear -> ReLU.
`"onehot"`:    one-hot vector     -> Linear -> ReLU -> Linear -> ReLU (the paper's Table 4 ablation).

Null action. An action value of -1 means "no action" and maps to one extra learned row (or one
extra one-hot slot). Classifier-free guidance drops the actions of a sample by setting all its
tokens to -1 (see `drop_actions`); the sampler's unconditional pass does the same.

Time position. Every token gets a fixed sin-cos embedding of the clip frame index at which its
action was taken (frame 0 = first condition frame). `action_positions` gives those indices for the
two conditioning modes of `workers/clips.split_sample`, so that a_t lands on the same index in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import sincos_1d

NULL_ACTION = -1
ENCODER_KINDS = ("embedding", "onehot")


@dataclass(frozen=True)
class ActionEncoderConfig:
    num_actions: int = 18
    """Size of the action set; 18 is the full ALE set, so one model covers every game."""
    kind: str = "embedding"
    """"embedding" (learned table) or "onehot"."""
    embed_dim: int = 128
    """Width of the learned embedding table ("embedding" only)."""
    hidden_size: int = 256
    """Width of the output tokens; the ST-DiT sets it to its own width."""

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"ActionEncoderConfig.kind={self.kind!r}; expected one of {ENCODER_KINDS}")
        if self.num_actions < 1:
            raise ValueError(f"ActionEncoderConfig.num_actions={self.num_actions}; must be >= 1")


ACTION_MODES = ("future", "past_future")
"""Which actions condition a generated chunk (the one place this rule is written):
`"future"`: a_t .. a_{t+T-1}, taken at window frames n-1 .. n+T-2 (T tokens);
`"past_future"`: a_{t-n+1} .. a_{t+T-1}, taken at frames 0 .. n+T-2 (n+T-1 tokens);
where frames 0..n-1 are the condition frames, t = n-1 the last of them, T the generated frames."""


def first_action_frame(n_cond: int, mode: str) -> int:
    """Window frame at which a mode's first action token is taken (n-1 for future, 0 for past_future)."""
    if mode == "future":
        return n_cond - 1
    if mode == "past_future":
        return 0
    raise ValueError(f"action mode {mode!r}; expected one of {ACTION_MODES}")


def num_action_tokens(n_cond: int, horizon: int, mode: str) -> int:
    """Action tokens of a chunk of `horizon` generated frames: T (future) or n+T-1 (past_future)."""
    return n_cond - 1 + horizon - first_action_frame(n_cond, mode)


def window_action_slice(n_cond: int, horizon: int, mode: str) -> slice:
    """The slice of a window's per-frame actions (B, L) that conditions its first `horizon` generated
    frames: actions[:, window_action_slice(...)] is (B, num_action_tokens(...))."""
    return slice(first_action_frame(n_cond, mode), n_cond + horizon - 1)


def action_positions(num_tokens: int, n_cond: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """Window frame index of each action token -> (A,) int64 (see ACTION_MODES)."""
    start = first_action_frame(n_cond, mode)
    return torch.arange(start, start + num_tokens, device=device)


def drop_actions(actions: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace every action of the samples where drop is True by the null action.

    actions: (B, A) int64, drop: (B,) bool -> (B, A) int64. Branch-free, so it compiles.
    """
    return torch.where(drop[:, None], torch.full_like(actions, NULL_ACTION), actions)


class ActionEncoder(nn.Module):
    def __init__(self, cfg: ActionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        n_rows = cfg.num_actions + 1  # last row/slot is the null action
        if cfg.kind == "embedding":
            self.embedding = nn.Embedding(n_rows, cfg.embed_dim)
            in_dim = cfg.embed_dim
        else:
            self.embedding = None
            in_dim = n_rows
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_size),
            nn.ReLU(),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.ReLU(),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        if self.embedding is not None:
            # Unit scale, like the one-hot rows: each token is its action's features plus a sin-cos
            # time embedding of unit scale. At std 0.02 the action part came out ~1% of the token,
            # its gradient ~10x smaller, and the final ReLU could die, leaving time-only tokens.
            nn.init.normal_(self.embedding.weight, std=1.0)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, actions: torch.Tensor, *, positions: torch.Tensor | None = None) -> torch.Tensor:
        """actions: (B, A) int64 in [0, num_actions) or -1 (null); positions: (A,) or (B, A) clip
        frame indices, default 0..A-1 -> tokens (B, A, D)."""
        B, A = actions.shape
        # -1 -> the extra last row; done with where (no data-dependent branch) so it compiles.
        idx = torch.where(actions < 0, torch.full_like(actions, self.cfg.num_actions), actions)  # (B, A)
        if self.embedding is not None:
            h = self.embedding(idx)  # (B, A, E)
        else:
            slots = torch.arange(self.cfg.num_actions + 1, device=actions.device)
            h = (idx[..., None] == slots).to(self.mlp[0].weight.dtype)  # (B, A, K+1) one-hot
        tokens = self.mlp(h)  # (B, A, D)
        if positions is None:
            positions = torch.arange(A, device=actions.device)  # (A,)
        pos = sincos_1d(positions, self.cfg.hidden_size).to(tokens.dtype)  # (A, D) or (B, A, D)
        return tokens + pos  # (B, A, D)
