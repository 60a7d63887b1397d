"""Parameter count and forward+backward FLOPs of every VAE and ST-DiT preset.

Counted with torch.utils.flop_counter.FlopCounterMode on the meta device, so even the 1.2B-
parameter preset costs no memory or time. FLOPs count multiply-adds as 2 (matmul, conv, SDPA).

    python -m benchmarks.model_flops --frames 8 --batch 1   (from the repository root)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.stdit import STDiT_models
from models.vae import VAE_models
from pipeline.cli import parse_config


@dataclass(frozen=True)
class FlopsConfig:
    """The clip each preset is counted on."""

    frames: int = 8
    """Latent frames seen by the ST-DiT (the VAE row encodes frames * temporal factor pixel frames)."""
    batch: int = 1
    """Clips per step."""
    height: int = 210
    """Pixel height of the clip (Atari: 210)."""
    width: int = 160
    """Pixel width of the clip (Atari: 160)."""
    spatial_downsample: int = 4
    """VAE spatial factor (latent H, W = pixels / factor, rounded up)."""
    temporal_downsample: int = 1
    """VAE temporal factor (pixel frames per latent frame)."""
    latent_channels: int = 4
    """Channels of the VAE latent (the ST-DiT's input)."""
    num_actions: int = 8
    """Action tokens per sample."""


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (torch's FlopCounterMode; run it on the meta device to count without computing)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(cfg: FlopsConfig) -> list[dict]:
    rows = []
    T_pix = cfg.frames * cfg.temporal_downsample
    with torch.device("meta"):
        for name, build in VAE_models.items():
            vae = build(spatial_downsample=cfg.spatial_downsample, temporal_downsample=cfg.temporal_downsample,
                        latent_channels=cfg.latent_channels)
            x = torch.empty(cfg.batch, T_pix, 3, cfg.height, cfg.width)

            def step(vae=vae, x=x):
                recon, mean, logvar = vae(x)
                (recon.square().mean() + mean.square().mean() + logvar.mean()).backward()

            rows.append(dict(model=f"VAE {name}", params=sum(p.numel() for p in vae.parameters()),
                             input=f"pixels {tuple(x.shape)}", flops=count_flops(step)))
        h, w = -(-cfg.height // cfg.spatial_downsample), -(-cfg.width // cfg.spatial_downsample)
        for name, build in STDiT_models.items():
            model = build(in_channels=cfg.latent_channels)
            x = torch.empty(cfg.batch, cfg.frames, cfg.latent_channels, h, w)
            t = torch.empty(cfg.batch)
            actions = torch.zeros(cfg.batch, cfg.num_actions, dtype=torch.long)
            mask = torch.ones(cfg.batch, cfg.frames, dtype=torch.bool)

            def step(model=model, x=x, t=t, actions=actions, mask=mask):
                model(x, t, actions=actions, frame_mask=mask).square().mean().backward()

            rows.append(dict(model=f"STDiT {name}", params=sum(p.numel() for p in model.parameters()),
                             input=f"latents {tuple(x.shape)}", flops=count_flops(step)))
    print(f"| model | params | input | fwd+bwd GFLOPs |\n| --- | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['input']} | {r['flops'] / 1e9:,.1f} |")
    return rows


if __name__ == "__main__":
    main(parse_config(FlopsConfig, description=__doc__))
