"""Transformer building blocks shared by the ST-DiT and the action encoder.

Names of submodules follow Open-Sora STDiT3's (`qkv`, `q_norm`, `proj`, `q_linear`, `kv_linear`,
`fc1`, `fc2`, `mlp.0`, `mlp.2`) so that `models/opensora.py` maps a checkpoint by renaming the
top-level prefixes only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x * (1 + scale) + shift`; shift/scale broadcast against x."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of scalar timesteps. t: (N,) float -> (N, dim), [cos | sin] halves.

    The [cos, sin] order and frequency ladder match DiT/Open-Sora, so their trained timestep MLPs
    read our features unchanged.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos features of (possibly negative) positions. pos: (...) -> (..., dim), [sin | cos]."""
    assert dim % 2 == 0, f"sin-cos width must be even, got {dim}"
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim))  # (dim/2,)
    args = pos.float()[..., None] * inv_freq  # (..., dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (..., dim)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of an h x w patch grid -> (h*w, dim), row-major.

    First half of the channels encodes the row, second half the column (Open-Sora's layout).
    """
    assert dim % 4 == 0, f"2D sin-cos width must be divisible by 4, got {dim}"
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(grid_r.reshape(-1), dim // 2), sincos_1d(grid_c.reshape(-1), dim // 2)], dim=-1)
    return emb  # (h*w, dim)


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> D-vector: sinusoidal features then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) -> (N, D)."""
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class RotaryEmbedding(nn.Module):
    """RoPE over the sequence axis with interleaved channel pairs (d0,d1), (d2,d3), ...

    The interleaved pairing and the 10000 base are what Open-Sora's temporal blocks were trained
    with; keeping them lets a loaded checkpoint see the same relative phases.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0, f"RoPE needs an even head width, got {head_dim}"
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: it is a pure function of head_dim, so checkpoints need not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, N, d) -> same, rotated by position along N."""
        n = x.shape[-2]
        pos = torch.arange(n, device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(x.device))  # (N, d/2)
        angles = angles.repeat_interleave(2, dim=-1)  # (N, d): each pair shares an angle
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1)  # (x0,x1) -> (-x1,x0)
        rotated = rearrange(rotated, "... d r -> ... (d r)")
        return x * cos + rotated * sin


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in the input's dtype: under bf16 autocast an fp32 weight would send
    `torch.rms_norm` to its slow unfused path (and keep fp32 copies of q and k)."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)
    return norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional q/k RMSNorm and RoPE, via SDPA."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = True, rope: bool = False):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # q/k RMSNorm keeps attention logits bounded at large widths (Open-Sora, SD3).
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(head_dim) if rope else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        qkv = rearrange(self.qkv(x), "B N (three h d) -> three B h N d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        q, k = _rms(self.q_norm, q), _rms(self.k_norm, k)  # (B, h, N, d)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(rearrange(out, "B h N d -> B N (h d)"))  # (B, N, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x, keys/values from conditioning tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D), cond: (B, A, D) -> (B, N, D)."""
        q = rearrange(self.q_linear(x), "B N (h d) -> B h N d", h=self.num_heads)  # (B, h, N, d)
        kv = rearrange(self.kv_linear(cond), "B A (two h d) -> two B h A d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, h, N, d)
        return self.proj(rearrange(out, "B h N d -> B N (h d)"))  # (B, N, D)


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
