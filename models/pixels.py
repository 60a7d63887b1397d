"""Pixels <-> model space: what every model input and output goes through (training and inference)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def pixels_to_model(frames: Tensor) -> Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, T, 3, H, W) in [-1, 1]."""
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"want uint8 frames (B, T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return rearrange(frames, "B T H W C -> B T C H W").float().div_(127.5).sub_(1.0)


def model_to_pixels(x: Tensor) -> Tensor:
    """float (B, T, 3, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), rounded and clamped."""
    x = ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return rearrange(x, "B T C H W -> B T H W C")
