"""How much of a game's small sprites a VAE keeps, by latent grid: x4 (53x40) against x2 (105x80).

Plays `--frames` steps of a real ALE game with random actions (full 210x160 RGB frames), holds out
the last `--held-out` of them, and trains one frame-wise VAE per spatial factor for the same wall
time each on the rest (L1 loss by default, as the pipeline's VAE stage; batch `--batch-size` frames). Then it
scores every VAE on the held-out frames, in pixel levels (0-255):

- `mse`: the mean squared error over all pixels, the floor of any latent world model's MSE;
- `sprite_mse`: the same over the pixels that differ from the held-out frames' per-pixel median
  (what moves: sprites, shots, flashes), and its share of the total squared error.

This is a probe at CPU scale (narrow VAEs, minutes of training): it says which grid keeps more of
the sprites in equal time, not what a full `gpu` preset run reaches.

    python -m benchmarks.probe_vae_grid --game DemonAttack --train-s 240
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.common import device_name, markdown_table, pick_device, sync, write_rows
from pipeline.cli import parse_config
from models.vae import VAE_models, vae_loss
from workers.atari import resolve_env_id
from models.pixels import model_to_pixels, pixels_to_model


@dataclass(frozen=True)
class ProbeVAEGridConfig:
    game: str = "DemonAttack"
    """ALE game (short name or ALE/<Game>-v5 id)."""
    frames: int = 3000
    """Frames played with random actions."""
    held_out: int = 256
    """The last frames of the play, scored and never trained on."""
    factors: tuple[int, ...] = (4, 2)
    """Spatial factors to compare."""
    preset: str = "tiny"
    """VAE preset (models.vae.VAE_models); its stem is capped at the factor."""
    latent_channels: int = 8
    recon_kind: str = "l1"
    """The VAE's reconstruction loss, "l1" (the pipeline's default) or "l2"."""
    train_s: float = 240.0
    """Training wall time per VAE."""
    batch_size: int = 8
    lr: float = 4e-4
    seed: int = 0
    device: str = "auto"
    out: str = ""
    """CSV of the table (optional)."""


def play(game: str, frames: int, seed: int) -> np.ndarray:
    """(frames, 210, 160, 3) uint8 RGB of one ALE env under random actions, resetting at game over."""
    return play_episodes(game, frames, seed)[0]


def play_episodes(game: str, frames: int, seed: int, frameskip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`play`, and the episode number of each frame (it rises by one at each reset). `frameskip`
    replaces the v5 env's 4 emulator frames per step."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(resolve_env_id(game), repeat_action_probability=0.0,
                   **({} if frameskip is None else {"frameskip": frameskip}))
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out = np.empty((frames, *obs.shape), dtype=np.uint8)
    episode = np.empty(frames, dtype=np.int64)
    n = 0
    for i in range(frames):
        out[i], episode[i] = obs, n
        obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        if term or trunc:
            obs, _ = env.reset()
            n += 1
    env.close()
    return out, episode


def main(cfg: ProbeVAEGridConfig) -> list[dict]:
    if cfg.held_out >= cfg.frames:
        raise ValueError(f"ProbeVAEGridConfig: held_out={cfg.held_out} must be below frames={cfg.frames}")
    device = pick_device(cfg.device)
    t0 = time.time()
    frames = torch.from_numpy(play(cfg.game, cfg.frames, cfg.seed))
    print(f"played {cfg.frames} frames of {cfg.game} in {time.time() - t0:.0f} s on {device_name(device)}")
    train, test = frames[:-cfg.held_out], frames[-cfg.held_out:]
    moving = (test != test.median(dim=0).values).any(dim=-1)  # (N, H, W) pixels off the static scene
    rows = []
    for factor in cfg.factors:
        torch.manual_seed(cfg.seed)
        vae = VAE_models[cfg.preset](latent_channels=cfg.latent_channels, spatial_downsample=factor,
                                     temporal_kernel=1).to(device)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        steps, start = 0, time.time()
        while time.time() - start < cfg.train_s:
            idx = torch.randint(len(train), (cfg.batch_size,), generator=gen)
            x = pixels_to_model(train[idx][:, None].to(device))  # (b, 1, 3, H, W): one-frame clips
            recon, mean, logvar = vae(x)
            loss, _ = vae_loss(x, recon, mean, logvar, 1e-4, recon_kind=cfg.recon_kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        sync(device)
        vae.eval()
        sq = []
        with torch.no_grad():
            for i in range(0, len(test), 32):
                x = pixels_to_model(test[i:i + 32][:, None].to(device))  # (b, 1, 3, H, W)
                mean, _ = vae.encode(x)
                pix = model_to_pixels(vae.decode(mean, 1, (x.shape[3], x.shape[4])))[:, 0].cpu()  # (b, H, W, 3)
                sq.append((pix.float() - test[i:i + 32].float()).pow(2).mean(dim=-1))  # (b, H, W)
        err = torch.cat(sq)  # (N, H, W) squared error per pixel, averaged over RGB
        h, w = vae.latent_hw((210, 160))
        rows.append({"game": cfg.game, "factor": factor, "loss": cfg.recon_kind, "latent": f"{cfg.latent_channels}x{h}x{w}",
                     "params_M": sum(p.numel() for p in vae.parameters()) / 1e6, "train_s": cfg.train_s,
                     "steps": steps, "mse": float(err.mean()), "sprite_mse": float(err[moving].mean()),
                     "sprite_share_pct": 100 * float(err[moving].sum() / err.sum().clamp_min(1e-12)),
                     "moving_pixels_pct": 100 * float(moving.float().mean())})
        print(rows[-1])
    print(markdown_table(rows, list(rows[0])))
    if cfg.out:
        print(f"wrote {write_rows(rows, cfg.out, {'device': device_name(device), 'config': repr(cfg)})}")
    return rows


if __name__ == "__main__":
    main(parse_config(ProbeVAEGridConfig, description=__doc__))
