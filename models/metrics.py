"""Frame-quality metrics on tensors: MSE on the 0-255 scale, PSNR, LPIPS, and copy-last baseline.

Layouts. `mse_255` reduces over the last three axes, so it takes either (..., H, W, 3) or
(..., 3, H, W) and returns the leading shape, e.g. (B, T): one value per frame. `score_frames` and
`lpips_frames` take the on-disk layout, uint8 (B, T, H, W, 3), because scores are taken against
the ground-truth frames as stored, at their native resolution (a model working at another
resolution resizes its predictions back first).

Value ranges. uint8 tensors are 0-255; floating tensors are model pixels in [-1, 1], mapped to
0-255 by (x + 1) * 127.5 without rounding or clamping (a prediction outside the range is
penalised as it is).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from models.lpips import LPIPS


def to_255(x: Tensor) -> Tensor:
    """uint8 0-255 or float [-1, 1] -> float32 on the 0-255 scale."""
    if x.dtype == torch.uint8:
        return x.float()
    if x.is_floating_point():
        return (x.float() + 1.0) * 127.5
    raise TypeError(f"frames must be uint8 (0-255) or floating point ([-1, 1]), got {x.dtype}")


def to_unit(x: Tensor) -> Tensor:
    """uint8 0-255 or float [-1, 1] -> float32 in [-1, 1]."""
    return to_255(x) / 127.5 - 1.0


def mse_255(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per frame on the 0-255 scale: (..., a, b, c) -> (...)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (to_255(pred) - to_255(target)).pow(2).mean(dim=(-3, -2, -1))


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB for an MSE on the 0-255 scale (data range 255); +inf where mse == 0."""
    return 10.0 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def lpips_frames(pred: Tensor, target: Tensor, model: LPIPS, chunk: int = 256) -> Tensor:
    """LPIPS per frame. pred, target: (B, T, H, W, 3), uint8 or [-1, 1] -> (B, T).

    Frames are batched; `chunk` only bounds the memory of one forward.
    """
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[-1] != 3:
        raise ValueError(f"want two (B, T, H, W, 3) tensors, got {tuple(pred.shape)} and {tuple(target.shape)}")
    B = pred.shape[0]
    device = next(model.parameters()).device
    x = rearrange(to_unit(pred), "B T H W C -> (B T) C H W")
    y = rearrange(to_unit(target), "B T H W C -> (B T) C H W")
    d = torch.cat([model(x[i : i + chunk].to(device), y[i : i + chunk].to(device)) for i in range(0, len(x), chunk)])
    return rearrange(d.cpu(), "(B T) -> B T", B=B)


def copy_last_prediction(cond_frames: Tensor, horizon: int) -> Tensor:
    """The copy-last baseline: the last condition frame repeated. (B, n, ...) -> (B, horizon, ...)."""
    if cond_frames.ndim < 2 or cond_frames.shape[1] < 1:
        raise ValueError(f"cond_frames must be (B, n>=1, ...), got {tuple(cond_frames.shape)}")
    return cond_frames[:, -1:].repeat_interleave(horizon, dim=1)


def score_frames(pred: Tensor, target: Tensor, lpips_model: LPIPS | None = None) -> dict[str, Tensor]:
    """Per-frame scores of predicted against true future frames.

    pred, target: (B, T, H, W, 3), uint8 or [-1, 1]. Returns {"mse", "psnr"[, "lpips"]}, each
    (B, T) float32 on the CPU: index t is the t-th generated frame, so averaging over axis 0 gives
    the per-horizon curve and over both axes the horizon mean.
    """
    if pred.ndim != 5 or pred.shape[-1] != 3:
        raise ValueError(f"score_frames wants (B, T, H, W, 3), got {tuple(pred.shape)}")
    mse = mse_255(pred, target).cpu()
    scores = {"mse": mse, "psnr": psnr(mse)}
    if lpips_model is not None:
        scores["lpips"] = lpips_frames(pred, target, lpips_model)
    return scores
