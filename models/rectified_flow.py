"""Rectified flow on video latents with clean condition frames: training loss and Euler sampler.

Straight paths from data to noise, x_t = (1 - t) * x0 + t * eps (t = 0 data, t = 1 noise); the
network predicts their constant velocity v = eps - x0. Only generated frames (frame_mask True)
are noised, trained on and integrated; condition frames stay exactly x0 throughout, so the model
always sees them clean (it embeds them with timestep 0 itself).

The network is any callable `model(x_t, t, *, actions, frame_mask, ...)` with
x_t: (B, T, C, H, W), t: (B,) in [0, 1], returning the velocity (B, T, C, H, W), as STDiT does.
Classifier-free guidance uses models.action_encoder's null action (-1) for whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from models.action_encoder import NULL_ACTION

Model = Callable[..., Tensor]


def _bcast(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1, 1) against (B, T, C, H, W)


def _check(x: Tensor, frame_mask: Tensor) -> None:
    if x.ndim != 5 or frame_mask.shape != x.shape[:2] or frame_mask.dtype != torch.bool:
        raise ValueError(
            f"want x (B, T, C, H, W) and a bool frame_mask (B, T); got {tuple(x.shape)} and "
            f"{tuple(frame_mask.shape)} {frame_mask.dtype}"
        )


@dataclass(frozen=True)
class RectifiedFlowConfig:
    t_sampling: str = "logit_normal"
    """How training timesteps are drawn: "logit_normal" (t = sigmoid(N(mean, std))) or "uniform"."""
    logit_mean: float = 0.0
    """Mean of the normal under the sigmoid; > 0 puts more weight on noisier timesteps."""
    logit_std: float = 1.0
    """Std of the normal under the sigmoid."""
    action_dropout: float = 0.0
    """Probability that a sample's whole action sequence is replaced by the null action, which
    trains the unconditional model that classifier-free guidance needs. 0 disables it."""


class RectifiedFlow:
    """Noising, velocity target and masked training loss."""

    def __init__(self, cfg: RectifiedFlowConfig = RectifiedFlowConfig()) -> None:
        if cfg.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {cfg.t_sampling!r}")
        if not 0.0 <= cfg.action_dropout <= 1.0:
            raise ValueError(f"action_dropout must be in [0, 1], got {cfg.action_dropout}")
        self.cfg = cfg

    def sample_t(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps (B,), strictly inside (0, 1) for the logit-normal."""
        if self.cfg.t_sampling == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        n = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * n)

    @staticmethod
    def add_noise(x0: Tensor, eps: Tensor, t: Tensor, frame_mask: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps on generated frames; condition frames are x0 exactly."""
        _check(x0, frame_mask)
        t = _bcast(t.to(x0.dtype))
        x_t = (1 - t) * x0 + t * eps
        return torch.where(frame_mask[:, :, None, None, None], x_t, x0)

    def drop_actions(self, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each sample's action sequence by the null action with prob. action_dropout."""
        if self.cfg.action_dropout == 0.0:
            return actions
        drop = torch.rand(actions.shape[0], device=actions.device, generator=generator) < self.cfg.action_dropout
        return torch.where(drop[:, None], torch.full_like(actions, NULL_ACTION), actions)

    def loss(
        self,
        model: Model,
        x0: Tensor,
        frame_mask: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond,
    ) -> Tensor:
        """Masked MSE between predicted and true velocity, over generated frames only.

        x0: (B, T, C, H, W) clean latents; frame_mask: (B, T) bool, True = generated; cond is
        passed to the model as keywords (actions=... is subject to action dropout). t and noise
        default to fresh draws (from `generator`).

        Nothing here waits for the device: no value of a device tensor is read on the host (a
        training step that did would drain the GPU's queue). So a frame_mask with no generated
        frame is refused only when it is on the CPU; on a GPU it gives a NaN loss, which
        training's non-finite check stops at.
        """
        _check(x0, frame_mask)
        if frame_mask.device.type == "cpu" and not frame_mask.any():
            raise ValueError("frame_mask marks no generated frame: the loss would be empty")
        B = x0.shape[0]
        if t is None:
            t = self.sample_t(B, x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if cond.get("actions") is not None:
            cond["actions"] = self.drop_actions(cond["actions"], generator)
        x_t = self.add_noise(x0, noise, t, frame_mask)
        v = model(x_t, t, frame_mask=frame_mask, **cond)  # (B, T, C, H, W)
        # torch.where rather than multiplying by the mask: condition frames then add exactly 0, even
        # where the network's output is inf/nan, and their gradient is exactly 0. Not boolean
        # indexing either, whose data-dependent shape makes the host wait for the device.
        err = torch.where(frame_mask[:, :, None, None, None], v - (noise - x0), 0.0)
        return err.pow(2).sum() / (frame_mask.sum() * x0[0, 0].numel())


@dataclass(frozen=True)
class EulerSamplerConfig:
    num_steps: int = 10
    """Euler steps from t = 1 (noise) to t = 0 (data)."""
    shift: float = 1.0
    """Timestep shift s: the uniform grid u is mapped to t = s u / (1 + (s - 1) u); s > 1 spends
    more steps at high noise. A fixed setting: Open-Sora derives it from resolution and clip
    length, a rule that collapses to no shift at all for clips under 17 frames."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on actions: v = v_uncond + g (v_cond - v_uncond). 1 = off (one
    conditional forward); needs a model trained with action dropout."""


class EulerSampler:
    """Integrates dx/dt = v(x, t) from t = 1 to 0, restoring the condition latents every step."""

    def __init__(self, cfg: EulerSamplerConfig = EulerSamplerConfig()) -> None:
        if cfg.num_steps < 1 or cfg.shift <= 0:
            raise ValueError(f"need num_steps >= 1 and shift > 0, got {cfg}")
        self.cfg = cfg

    def timesteps(self, device: torch.device | str = "cpu") -> Tensor:
        """(num_steps + 1,) decreasing from 1 to 0."""
        u = torch.linspace(1.0, 0.0, self.cfg.num_steps + 1, device=device)
        s = self.cfg.shift
        return s * u / (1 + (s - 1) * u)

    def velocity(self, model: Model, x: Tensor, t: Tensor, frame_mask: Tensor, cond: dict) -> Tensor:
        g = self.cfg.guidance_scale
        if g == 1.0 or cond.get("actions") is None:
            return model(x, t, frame_mask=frame_mask, **cond)
        # Conditional and unconditional halves in one batched forward.
        actions = cond["actions"]
        both = dict(cond, actions=torch.cat([actions, torch.full_like(actions, NULL_ACTION)]))
        for k, v in cond.items():
            if k != "actions" and isinstance(v, Tensor) and v.shape[:1] == x.shape[:1]:
                both[k] = torch.cat([v, v])
        v_c, v_u = model(
            torch.cat([x, x]), torch.cat([t, t]), frame_mask=torch.cat([frame_mask, frame_mask]), **both
        ).chunk(2)
        return v_u + g * (v_c - v_u)

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        x_cond: Tensor,
        frame_mask: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond,
    ) -> Tensor:
        """x_cond: (B, T, C, H, W) holding the condition latents where frame_mask is False (values
        at generated frames are ignored); frame_mask: (B, T) bool, True = generated.
        Returns (B, T, C, H, W) whose condition frames are bit-identical to x_cond's."""
        _check(x_cond, frame_mask)
        if noise is None:
            noise = torch.randn(x_cond.shape, device=x_cond.device, dtype=x_cond.dtype, generator=generator)
        keep = ~frame_mask[:, :, None, None, None]
        x = torch.where(keep, x_cond, noise)
        ts = self.timesteps(x_cond.device).to(x_cond.dtype)
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(model, x, t_cur.expand(x.shape[0]), frame_mask, cond)
            x = x + (t_next - t_cur) * v
            x = torch.where(keep, x_cond, x)  # the condition is given, not generated
        return x
