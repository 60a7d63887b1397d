"""ST-DiT: spatio-temporal diffusion transformer over VAE latents, conditioned on actions.

Layout follows Open-Sora v1.2's STDiT3 (so its checkpoints map onto the "XL/2" preset, see
`models/opensora.py`): PatchEmbed3D -> fixed 2D sin-cos position embedding -> `depth` pairs of
(SpatialBlock, TemporalBlock) -> adaLN final layer -> unpatchify. Text cross-attention is replaced
by cross-attention to action tokens from `models/action_encoder.py`.

Conditioning on clean frames: `frame_mask` (B, T) is True on generated frames. Condition frames are
modulated with the embedding of timestep 0, selected per frame with `torch.where` (no Python
branching, so `torch.compile(fullgraph=True)` traces one graph).

Classifier-free guidance: an action value of -1 is the learned null action
(`models.action_encoder.drop_actions(actions, drop)` sets whole samples to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.action_encoder import ActionEncoder, ActionEncoderConfig
from models.layers import MLP, CrossAttention, SelfAttention, TimestepEmbedder, modulate, sincos_1d, sincos_2d


@dataclass(frozen=True)
class STDiTConfig:
    in_channels: int = 4
    """Latent channels of the VAE."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(time, height, width) patch; Conv3d kernel == stride."""
    hidden_size: int = 384
    """Transformer width D."""
    depth: int = 12
    """Number of (spatial, temporal) block pairs."""
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    """RMSNorm on queries and keys of self-attention."""
    num_actions: int = 18
    """Size of the action set (18 = full ALE set)."""
    action_encoder: str = "embedding"
    """"embedding" or "onehot" (paper, Table 4)."""
    action_embed_dim: int = 128
    """Width of the learned action table (embedding encoder only)."""
    temporal_pos_embed: bool = False
    """Add a fixed sin-cos embedding of each token-frame's clip frame index (the same function
    that places the action tokens), so that cross-attention queries carry their absolute frame as
    the action tokens do; otherwise (as in Open-Sora STDiT3) time enters only through RoPE's
    relative offsets. Off by default: on tests/test_learning.py's sprite game it made no
    measurable difference (held-out MSE 66 vs 68, 39 vs 43 on two seeds)."""
    timestep_scale: float = 1000.0
    """t in [0, 1] is multiplied by this before the sinusoidal features; 1000 is the range
    Open-Sora's rectified flow feeds its timestep embedder, so loaded weights see familiar inputs."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"STDiTConfig: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"STDiTConfig: hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos)")
        if len(self.patch_size) != 3:
            raise ValueError(f"STDiTConfig: patch_size={self.patch_size} must be (t, h, w)")


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens; pads T/H/W up to a multiple of the patch first."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C, H, W) -> (B, T', h, w, D) with T'=ceil(T/pt), h=ceil(H/ph), w=ceil(W/pw)."""
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[1], x.shape[3], x.shape[4]
        x = rearrange(x, "B T C H W -> B C T H W")
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))  # (B, C, T+, H+, W+)
        x = self.proj(x)  # (B, D, T', h, w)
        # One copy here into channels-last order: the residual stream then stays contiguous, and
        # every LayerNorm and Linear of every block (and their backward passes) reads it without
        # first copying a transposed view.
        return rearrange(x, "B D T h w -> B T h w D").contiguous()


class STBlock(nn.Module):
    """One STDiT3 block; subclasses say over which axis self-attention mixes tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, rope: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        # adaLN-single: the block adds its own learned offsets to the shared t_block output.
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D), mod: (B, T, 6, D) per-frame t_block output, cond: (B, A, D) -> (B, T, S, D)."""
        T = x.shape[1]
        params = (self.scale_shift_table + mod).unsqueeze(3)  # (B, T, 6, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = params.unbind(2)  # (B, T, 1, D) each
        x = x + gate_msa * self.attend(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, S, D)
        q = rearrange(x, "B T S D -> B (T S) D")
        x = x + rearrange(self.cross_attn(q, cond), "B (T S) D -> B T S D", T=T)  # (B, T, S, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, S, D)
        return x


class SpatialBlock(STBlock):
    """Self-attention over the patches of one frame."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm, rope=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = self.attn(rearrange(x, "B T S D -> (B T) S D"))  # (B*T, S, D)
        return rearrange(y, "(B T) S D -> B T S D", B=B)


class TemporalBlock(STBlock):
    """Self-attention over the frames at one patch, with RoPE on the frame index."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm, rope=True)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = self.attn(rearrange(x, "B T S D -> (B S) T D"))  # (B*S, T, D)
        return rearrange(y, "(B S) T D -> B T S D", B=B)


class FinalLayer(nn.Module):
    """adaLN (per frame) -> Linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D), t_emb: (B, T, D) per-frame timestep embedding -> (B, T, S, P*C)."""
        shift, scale = (self.scale_shift_table + t_emb[:, :, None]).unsqueeze(3).unbind(2)  # (B, T, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, S, P*C)


class STDiT(nn.Module):
    def __init__(self, cfg: STDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # shared adaLN-single projection
        self.action_embedder = ActionEncoder(
            ActionEncoderConfig(
                num_actions=cfg.num_actions, kind=cfg.action_encoder, embed_dim=cfg.action_embed_dim, hidden_size=D
            )
        )
        blk = dict(hidden_size=D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.spatial_blocks = nn.ModuleList([SpatialBlock(**blk) for _ in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList([TemporalBlock(**blk) for _ in range(cfg.depth)])
        pt, ph, pw = cfg.patch_size
        self.final_layer = FinalLayer(D, pt * ph * pw, cfg.in_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        D = self.cfg.hidden_size
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # a patch embed is a linear map of the patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            nn.init.normal_(block.scale_shift_table, std=D**-0.5)
        # Temporal blocks start as identities, so a model warm-started from per-frame (image)
        # weights begins by treating frames independently and learns the mixing (Open-Sora).
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)
        nn.init.normal_(self.final_layer.scale_shift_table, std=D**-0.5)
        # Zero output: the untrained network predicts zero velocity instead of noise (DiT).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.action_embedder.initialize_weights()

    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(h*w, D) sin-cos table for the actual patch grid, cached per grid size outside compile."""
        if torch.compiler.is_compiling():
            return sincos_2d(h, w, self.cfg.hidden_size, device).to(dtype)  # traced once, folded by the compiler
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(h, w, self.cfg.hidden_size, device).to(dtype)
        return self._pos_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        actions: torch.Tensor,
        frame_mask: torch.Tensor,
        action_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C, H, W) latents, t: (B,) in [0, 1], actions: (B, A) int64 (-1 = null action),
        frame_mask: (B, T) bool True = generated, action_positions: (A,) or (B, A) clip frame index
        of each action (default 0..A-1) -> velocity (B, T, C, H, W)."""
        B, T, C, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        x = self.x_embedder(x)  # (B, T', h, w, D)
        Tp, h, w = x.shape[1], x.shape[2], x.shape[3]
        x = rearrange(x, "B T h w D -> B T (h w) D") + self.pos_embed(h, w, x.device, x.dtype)  # (B, T', S, D)
        if self.cfg.temporal_pos_embed:
            frames = torch.arange(Tp, device=x.device) * pt  # clip frame index where each token-frame starts
            x = x + sincos_1d(frames, self.cfg.hidden_size).to(x.dtype)[None, :, None]  # (B, T', S, D)

        # A token-frame is "generated" if any frame in its temporal patch is; padding counts as generated.
        mask = F.pad(frame_mask, (0, Tp * pt - T), value=True)  # (B, T'*pt)
        mask = rearrange(mask, "B (T pt) -> B T pt", pt=pt).any(dim=-1)  # (B, T')

        # Embed t and timestep 0 in one pass, then pick per frame.
        t_both = torch.cat([t, torch.zeros_like(t)]) * self.cfg.timestep_scale  # (2B,)
        emb = self.t_embedder(t_both)  # (2B, D)
        t_mod = rearrange(self.t_block(emb), "(two B) (six D) -> two B six D", two=2, six=6)  # (2, B, 6, D)
        emb = rearrange(emb, "(two B) D -> two B D", two=2)  # (2, B, D)
        m = mask[:, :, None, None]  # (B, T', 1, 1)
        mod = torch.where(m, t_mod[0][:, None], t_mod[1][:, None])  # (B, T', 6, D)
        t_emb = torch.where(mask[:, :, None], emb[0][:, None], emb[1][:, None])  # (B, T', D)

        cond = self.action_embedder(actions, positions=action_positions).to(x.dtype)  # (B, A, D)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, mod, cond)  # (B, T', S, D)
            x = temporal(x, mod, cond)  # (B, T', S, D)

        x = self.final_layer(x, t_emb)  # (B, T', S, pt*ph*pw*C)
        x = rearrange(
            x, "B T (h w) (pt ph pw C) -> B (T pt) C (h ph) (w pw)", h=h, w=w, pt=pt, ph=ph, pw=pw, C=C
        )  # (B, T'*pt, C, h*ph, w*pw)
        return x[:, :T, :, :H, :W]  # (B, T, C, H, W): drop the patch padding


def STDiT_tiny(**kw) -> STDiT:
    return STDiT(STDiTConfig(**{"hidden_size": 64, "depth": 2, "num_heads": 4, "action_embed_dim": 32, **kw}))


def STDiT_S(**kw) -> STDiT:
    return STDiT(STDiTConfig(**{"hidden_size": 384, "depth": 12, "num_heads": 6, **kw}))


def STDiT_B(**kw) -> STDiT:
    return STDiT(STDiTConfig(**{"hidden_size": 768, "depth": 12, "num_heads": 12, **kw}))


def STDiT_L(**kw) -> STDiT:
    return STDiT(STDiTConfig(**{"hidden_size": 1024, "depth": 24, "num_heads": 16, **kw}))


def STDiT_XL_2(**kw) -> STDiT:
    """Open-Sora STDiT3-XL/2's shape: its checkpoints load through `models.opensora`."""
    return STDiT(
        STDiTConfig(**{"hidden_size": 1152, "depth": 28, "num_heads": 16, "patch_size": (1, 2, 2), "in_channels": 4, **kw})
    )


STDiT_models = {"tiny": STDiT_tiny, "S": STDiT_S, "B": STDiT_B, "L": STDiT_L, "XL/2": STDiT_XL_2}
