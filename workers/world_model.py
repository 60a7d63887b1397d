"""The trained world model as one object: frozen VAE + ST-DiT + Euler sampler, uint8 in and out.

On disk a world model is a directory:

    vae.pt, vae.json            VAE state dict (EMA weights) and its VAEConfig
    dit.pt, world_model.json    ST-DiT state dict (EMA weights) and everything inference needs:
                                STDiTConfig, latent_scale, n_cond, horizon, action_mode, sampler

`save_vae`/`load_vae` handle the VAE alone (the DiT job starts from it); `save_world_model` and
`load_world_model(path)` the whole thing. The same directory is logged to MLflow as an artifact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.action_encoder import ACTION_MODES, action_positions, first_action_frame, num_action_tokens
from models.rectified_flow import EulerSampler, EulerSamplerConfig
from models.stdit import STDiT, STDiTConfig
from models.vae import VAEConfig, VideoVAE
from models.config import config_from_dict
from models.pixels import model_to_pixels, pixels_to_model

def save_vae(path: str | Path, vae: VideoVAE) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), path / "vae.pt")
    (path / "vae.json").write_text(json.dumps(dataclasses.asdict(vae.cfg), indent=1))
    return path


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> VideoVAE:
    """A frozen VAE in eval mode."""
    path = Path(path)
    if not (path / "vae.json").is_file() or not (path / "vae.pt").is_file():
        raise FileNotFoundError(f"{path} is not a VAE directory (needs vae.json and vae.pt)")
    vae = VideoVAE(config_from_dict(VAEConfig, json.loads((path / "vae.json").read_text())))
    vae.load_state_dict(torch.load(path / "vae.pt", map_location=map_location, weights_only=True))
    return vae.to(map_location).eval().requires_grad_(False)


class WorldModel:
    """Generates future frames from condition frames and actions.

    `predict` takes the n_cond condition frames and the actions of the rollout and returns
    `horizon` frames; horizons longer than the trained one are chained: each chunk is conditioned
    on the last n_cond frames so far (generated ones included).
    """

    def __init__(self, vae: VideoVAE, dit: STDiT, *, latent_scale: float, n_cond: int, horizon: int,
                 action_mode: str, sampler: EulerSamplerConfig = EulerSamplerConfig(),
                 trained_horizons: tuple[int, ...] = ()):
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode={action_mode!r}; expected one of {ACTION_MODES}")
        if n_cond % vae.frames_per_latent:
            raise ValueError(f"n_cond={n_cond} must be a multiple of the VAE's temporal factor "
                             f"{vae.frames_per_latent} so that condition latents hold no future frame")
        self.vae, self.dit = vae.eval(), dit.eval()
        self.latent_scale, self.n_cond, self.horizon = latent_scale, n_cond, horizon
        self.action_mode = action_mode
        # Generation lengths the DiT was trained to produce in one chunk (see
        # TrainDiTConfig.horizon_choices); `horizon` is the longest.
        self.trained_horizons = tuple(trained_horizons) or (horizon,)
        # A fixed chunk length for every rollout (e.g. 1 = one frame at a time, for comparing
        # single-step with multi-frame generation on the same weights); None = automatic.
        self.chunk: int | None = None
        self.sampler = EulerSampler(sampler)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def to(self, device: str | torch.device) -> "WorldModel":
        self.vae.to(device)
        self.dit.to(device)
        return self

    def num_actions_for(self, horizon: int) -> int:
        """Length of the action sequence `predict` wants for a rollout of `horizon` frames."""
        return num_action_tokens(self.n_cond, horizon, self.action_mode)

    @torch.no_grad()
    def reconstruct(self, frames: Tensor) -> Tensor:
        """uint8 (B, T, H, W, 3) -> the VAE's reconstruction, uint8 (B, T, H, W, 3) on the CPU: the
        floor under any generated frame's error."""
        B, T, H, W, _ = frames.shape
        mean, _ = self.vae.encode(pixels_to_model(frames.to(self.device)))
        return model_to_pixels(self.vae.decode(mean, T, (H, W))).cpu()

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """uint8 (B, T, H, W, 3) -> scaled latent means (B, T', C, h, w)."""
        mean, _ = self.vae.encode(pixels_to_model(frames.to(self.device)))
        return mean * self.latent_scale

    @torch.no_grad()
    def _chunk(self, context: Tensor, actions: Tensor, generator: torch.Generator | None, length: int) -> Tensor:
        """One chunk of a trained length. context: uint8 (B, n, H, W, 3); actions: (B, A) for this
        chunk -> uint8 (B, length, H, W, 3)."""
        B, n, H, W, _ = context.shape
        L = n + length
        z_cond = self.encode(context)  # (B, n/f, C, h, w)
        T_lat = self.vae.latent_frames(L)
        z = torch.zeros(B, T_lat, *z_cond.shape[2:], device=self.device, dtype=z_cond.dtype)
        z[:, : z_cond.shape[1]] = z_cond
        frame_mask = torch.arange(L, device=self.device).expand(B, L) >= n  # (B, L) True = generated
        lat_mask = self.vae.latent_frame_mask(frame_mask)  # (B, T')
        pos = action_positions(actions.shape[1], n, self.action_mode, device=self.device)
        z = self.sampler.sample(self.dit, z, lat_mask, generator=generator,
                                actions=actions.to(self.device), action_positions=pos)
        video = self.vae.decode(z / self.latent_scale, L, (H, W))  # (B, L, 3, H, W)
        return model_to_pixels(video[:, n:])  # (B, horizon, H, W, 3)

    @property
    def framewise(self) -> bool:
        """Whether the VAE maps each frame to its own latent frame and back, alone (no temporal
        downsampling, temporal kernel 1): then a rollout can carry latents instead of pixels."""
        return self.vae.cfg.temporal_downsample == 1 and self.vae.cfg.temporal_kernel == 1

    @torch.no_grad()
    def chunk_from_latents(self, z_cond: Tensor, actions: Tensor, length: int, frame_hw: tuple[int, int],
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One chunk from scaled condition latents (a framewise VAE only): z_cond (B, n, C, h, w) on the
        model's device, actions (B, A) for this chunk -> (the chunk's latents (B, length, C, h, w),
        its frames uint8 (B, length, H, W, 3) on the device). Only the new frames are decoded and
        nothing is encoded: an imagined rollout keeps its latents (`workers/imagination.py`)."""
        if not self.framewise:
            raise ValueError("chunk_from_latents needs a framewise VAE (temporal_downsample 1, temporal_kernel 1)")
        B, n = z_cond.shape[:2]
        L = n + length
        z = torch.zeros(B, L, *z_cond.shape[2:], device=self.device, dtype=z_cond.dtype)
        z[:, :n] = z_cond
        lat_mask = torch.arange(L, device=self.device).expand(B, L) >= n  # (B, L) True = generated
        pos = action_positions(actions.shape[1], n, self.action_mode, device=self.device)
        z = self.sampler.sample(self.dit, z, lat_mask, generator=generator, actions=actions.to(self.device),
                                action_positions=pos)
        new = z[:, n:]
        return new, model_to_pixels(self.vae.decode(new / self.latent_scale, length, frame_hw))

    @torch.no_grad()
    def predict(self, cond_frames: Tensor, actions: Tensor, horizon: int,
                generator: torch.Generator | None = None) -> Tensor:
        """cond_frames: uint8 (B, n, H, W, 3); actions: int64 (B, A) with A = num_actions_for(horizon)
        ("future": a_t..a_{t+H-1}; "past_future": a_{t-n+1}..a_{t+H-1}) -> uint8 (B, horizon, H, W, 3)."""
        if cond_frames.dtype != torch.uint8 or cond_frames.ndim != 5 or cond_frames.shape[1] != self.n_cond:
            raise ValueError(f"cond_frames must be uint8 (B, {self.n_cond}, H, W, 3), "
                             f"got {cond_frames.dtype} {tuple(cond_frames.shape)}")
        want = self.num_actions_for(horizon)
        if actions.ndim != 2 or actions.shape != (cond_frames.shape[0], want):
            raise ValueError(f"actions must be (B, {want}) for horizon {horizon} in mode "
                             f"{self.action_mode!r}, got {tuple(actions.shape)}")
        actions = actions.long()
        num = self.dit.cfg.num_actions
        if ((actions >= num) | (actions < -1)).any():
            raise ValueError(f"actions outside the game's action set: valid are 0..{num - 1} (and -1 for none), got "
                             f"{sorted(set(actions[(actions >= num) | (actions < -1)].tolist()))}")
        # A horizon the model was trained for is one chunk of exactly that length. Otherwise chunks
        # of the longest trained length are chained; past the requested horizon the last action is
        # repeated and the extra frames are dropped.
        if self.chunk is not None and self.chunk not in self.trained_horizons:
            raise ValueError(f"WorldModel.chunk={self.chunk} is not a trained generation length {self.trained_horizons}")
        size = self.chunk or (horizon if horizon in self.trained_horizons else self.horizon)
        chunks = -(-horizon // size)
        pad = chunks * size - horizon
        actions = torch.cat([actions, actions[:, -1:].expand(-1, pad)], dim=1)
        frames = cond_frames.to(self.device)  # (B, n + generated so far, H, W, 3)
        offset = self.n_cond - 1 - first_action_frame(self.n_cond, self.action_mode)  # past actions before a_t
        for c in range(chunks):
            s = c * size  # frames generated before this chunk
            acts = actions[:, s: s + offset + size]
            new = self._chunk(frames[:, -self.n_cond:], acts, generator, size)
            frames = torch.cat([frames, new], dim=1)
        return frames[:, self.n_cond: self.n_cond + horizon].cpu()


def world_model_meta(dit: STDiT, *, latent_scale: float, n_cond: int, horizon: int, action_mode: str,
                     sample_steps: int, trained_horizons: tuple[int, ...] = (),
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"dit": dataclasses.asdict(dit.cfg), "latent_scale": latent_scale, "n_cond": n_cond,
            "horizon": horizon, "trained_horizons": list(trained_horizons or (horizon,)),
            "action_mode": action_mode, "sample_steps": sample_steps, **(extra or {})}


def save_world_model(path: str | Path, vae: VideoVAE, dit: STDiT, meta: dict[str, Any]) -> Path:
    path = save_vae(path, vae)
    torch.save(dit.state_dict(), path / "dit.pt")
    (path / "world_model.json").write_text(json.dumps(meta, indent=1))
    return path


def check_guidance(guidance_scale: float, meta: dict[str, Any], path: str | Path) -> None:
    """Refuse classifier-free guidance over actions (guidance_scale != 1) on a DiT whose training
    never dropped its actions (`train_config.action_dropout` == 0 in world_model.json): its
    unconditional pass, fed null actions it never saw, is no unconditional model, and guiding
    with it extrapolates from noise. A model folder that records no train_config (built outside
    `pipeline/train.py`) is not checked: nothing says how it was trained."""
    if guidance_scale == 1.0:
        return
    train = meta.get("train_config") or {}
    if "action_dropout" not in train:
        return
    dropout = float(train["action_dropout"])
    if dropout <= 0.0:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a world model trained with action dropout, but {path} was "
            f"trained with action_dropout={train['action_dropout']} (its world_model.json train_config): "
            f"classifier-free guidance over actions needs a DiT that saw dropped actions. Sample it with "
            f"guidance_scale=1, or train one with TrainDiTConfig.action_dropout > 0 (e.g. 0.1: "
            f"`--action-dropout 0.1` for the DiT training job, `--set dit.action_dropout=0.1` for "
            f"pipeline/run_all.py)")


def load_world_model(path: str | Path, map_location: str | torch.device = "cpu",
                     sample_steps: int | None = None, guidance_scale: float | None = None) -> WorldModel:
    """A WorldModel from a directory written by save_world_model (e.g. an MLflow artifact);
    `sample_steps` and `guidance_scale` (classifier-free guidance over actions; needs a DiT trained
    with action dropout) replace the model's own sampler settings. A guidance_scale other than 1 on
    a model whose train_config records action_dropout 0 is refused (`check_guidance`)."""
    path = Path(path)
    meta_file = path / "world_model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a world-model directory (no world_model.json)")
    meta = json.loads(meta_file.read_text())
    g = meta.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    check_guidance(g, meta, path)  # before any weights load
    vae = load_vae(path, map_location)
    dit = STDiT(config_from_dict(STDiTConfig, meta["dit"]))
    dit.load_state_dict(torch.load(path / "dit.pt", map_location=map_location, weights_only=True))
    dit = dit.to(map_location).eval().requires_grad_(False)
    steps = sample_steps or meta["sample_steps"]
    return WorldModel(vae, dit, latent_scale=meta["latent_scale"], n_cond=meta["n_cond"],
                      horizon=meta["horizon"], action_mode=meta["action_mode"],
                      sampler=EulerSamplerConfig(num_steps=steps, guidance_scale=g),
                      trained_horizons=tuple(meta.get("trained_horizons", ())))
