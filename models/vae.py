"""Spatio-temporal VAE with causal 3D convolutions and a KL-regularised Gaussian latent.

Causality. Every convolution with a temporal extent pads only on the past side (replicating the
first frame), and temporal down/up-sampling folds each group of `f` frames into channels and back.
So latent frame j depends on pixel frames < (j+1)*f only, and decoded frames of group j depend on
latents <= j only: editing later frames never changes earlier latents.

Frames -> latent frames. Groups of `f = temporal_downsample` consecutive frames, aligned to the
first frame of the clip: latent j covers frames [j*f, (j+1)*f). A clip whose length is not a
multiple of f is padded at its end (the future side) by repeating its last frame, and decoding
crops back to the requested length: `latent_frames(T) = ceil(T / f)`. Aligning groups to the start
keeps n condition frames (n a multiple of f) in exactly n/f latents that hold no future frame; a
short future shares its last latent with padding (see `latent_frame_mask`).

Space. H, W are padded (replicate) up to a multiple of the spatial factor and cropped back exactly
on decode: 210x160 with x4 -> 212x160 -> 53x40 latents; with x8 -> 216x160 -> 27x20; with x2 ->
105x80.

No attention anywhere, so cost is linear in pixels and the tiny preset runs on CPU in CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    spatial_downsample: int = 4
    """Spatial factor: 4 (the paper), 8, or 2 (a finer latent grid for small sprites; pair it with
    a DiT patch twice as wide to keep the token count)."""
    temporal_downsample: int = 1
    """Frames per latent frame: 1, 2 or 4."""
    stem_patch: int = 1
    """Space-to-depth factor of the stem (1, 2, 4); the rest of the spatial factor is strided
    convs. Larger means cheaper: the tiny preset does all of x4 this way to run on CPU."""
    base_channels: int = 64
    """Channels of the first level; each further level doubles them, up to max_channels."""
    max_channels: int = 256
    num_res_blocks: int = 1
    """Residual blocks per level (encoder and decoder)."""
    temporal_kernel: int = 3
    """Temporal extent of the causal convolutions (1 = per-frame 2D convs)."""
    norm_groups: int = 8

    def __post_init__(self) -> None:
        if self.spatial_downsample not in (2, 4, 8):
            raise ValueError(f"VAEConfig.spatial_downsample={self.spatial_downsample}; expected 2, 4 or 8")
        if self.temporal_downsample not in (1, 2, 4):
            raise ValueError(f"VAEConfig.temporal_downsample={self.temporal_downsample}; expected 1, 2 or 4")
        if self.stem_patch not in (1, 2, 4) or self.spatial_downsample % self.stem_patch:
            raise ValueError(
                f"VAEConfig.stem_patch={self.stem_patch}; must be 1, 2 or 4 and divide spatial_downsample"
            )

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.spatial_downsample // self.stem_patch))

    def channels(self, level: int) -> int:
        return min(self.base_channels * 2**level, self.max_channels)


class CausalConv3d(nn.Module):
    """Conv3d with kernel (kt, k, k), 'same' in space, padded with kt-1 copies of the first frame."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3)):
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) -> (B, C', T, H, W)."""
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0), mode="replicate")  # (B, C, T+kt-1, H, W)
            return self.conv(x)
        return frame_conv(self.conv, x)


def frame_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A Conv3d of temporal extent 1 run as a 2D convolution over the B*T frames (same weights):
    GPU libraries have much faster kernels for 2D than for 3D convolutions.
    x: (B, C, T, H, W) -> (B, C', T, H', W')."""
    T = x.shape[2]
    w = conv.weight[:, :, 0]  # (C', C, kh, kw)
    y = F.conv2d(rearrange(x, "B C T H W -> (B T) C H W"), w, conv.bias, conv.stride[1:], conv.padding[1:])
    return rearrange(y, "(B T) C H W -> B C T H W", T=T)


class FrameConv3d(nn.Conv3d):
    """nn.Conv3d with kernel (1, k, k): computed by `frame_conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frame_conv(self, x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: normalising over time would leak the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        y = super().forward(rearrange(x, "B C T H W -> (B T) C H W"))
        return rearrange(y, "(B T) C H W -> B C T H W", T=T)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        k = (cfg.temporal_kernel, 3, 3)
        self.norm1 = FrameGroupNorm(min(cfg.norm_groups, cin), cin)
        self.conv1 = CausalConv3d(cin, cout, k)
        self.norm2 = FrameGroupNorm(min(cfg.norm_groups, cout), cout)
        self.conv2 = CausalConv3d(cout, cout, k)
        self.skip = FrameConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C', T, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C', T, H, W)
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        p, k = cfg.stem_patch, (cfg.temporal_kernel, 3, 3)
        self.conv_in = CausalConv3d(cfg.in_channels * p * p, cfg.channels(0), k)
        blocks: list[nn.Module] = []
        cin = cfg.channels(0)
        for level in range(cfg.num_downsamples + 1):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, cfg.channels(level), cfg))
                cin = cfg.channels(level)
            if level < cfg.num_downsamples:  # strided in space only: no temporal extent, so causal
                blocks.append(FrameConv3d(cin, cin, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
        self.blocks = nn.Sequential(*blocks)
        f = cfg.temporal_downsample
        self.time_down = FrameConv3d(cin * f, cin, 1)  # a group of f frames, folded into channels
        self.mid = ResBlock(cin, cin, cfg)
        self.norm_out = FrameGroupNorm(min(cfg.norm_groups, cin), cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W), T % f == 0, H, W % spatial == 0 -> (B, 2*C_lat, T/f, H/s, W/s)."""
        p, f = self.cfg.stem_patch, self.cfg.temporal_downsample
        x = rearrange(x, "B C T (H p) (W q) -> B (C p q) T H W", p=p, q=p)  # (B, 3p², T, H/p, W/p)
        x = self.blocks(self.conv_in(x))  # (B, Cl, T, H/s, W/s)
        x = self.time_down(rearrange(x, "B C (T f) H W -> B (C f) T H W", f=f))  # (B, Cl, T/f, H/s, W/s)
        x = self.mid(x)  # (B, Cl, T/f, H/s, W/s)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2*C_lat, T/f, H/s, W/s)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        p, k, f = cfg.stem_patch, (cfg.temporal_kernel, 3, 3), cfg.temporal_downsample
        cin = cfg.channels(cfg.num_downsamples)
        self.conv_in = CausalConv3d(cfg.latent_channels, cin, k)
        self.mid = ResBlock(cin, cin, cfg)
        self.time_up = FrameConv3d(cin, cin * f, 1)  # one latent frame -> a group of f frames
        blocks: list[nn.Module] = []
        for level in reversed(range(cfg.num_downsamples + 1)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, cfg.channels(level), cfg))
                cin = cfg.channels(level)
            if level > 0:
                blocks.append(nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"))
                blocks.append(FrameConv3d(cin, cin, (1, 3, 3), padding=(0, 1, 1)))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameGroupNorm(min(cfg.norm_groups, cin), cin)
        self.conv_out = CausalConv3d(cin, cfg.in_channels * p * p, k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C_lat, T', h, w) -> (B, 3, T'*f, h*s, w*s)."""
        p, f = self.cfg.stem_patch, self.cfg.temporal_downsample
        x = self.mid(self.conv_in(z))  # (B, Cl, T', h, w)
        x = rearrange(self.time_up(x), "B (C f) T H W -> B C (T f) H W", f=f)  # (B, Cl, T'f, h, w)
        x = self.conv_out(F.silu(self.norm_out(self.blocks(x))))  # (B, 3p², T'f, H/p, W/p)
        return rearrange(x, "B (C p q) T H W -> B C T (H p) (W q)", p=p, q=p)  # (B, 3, T'f, H, W)


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def frames_per_latent(self) -> int:
        return self.cfg.temporal_downsample

    def latent_frames(self, num_frames: int) -> int:
        """Number of latent frames for a clip of num_frames frames: ceil(T / f)."""
        return -(-num_frames // self.cfg.temporal_downsample)

    def latent_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        s = self.cfg.spatial_downsample
        return -(-hw[0] // s), -(-hw[1] // s)

    def latent_frame_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Per-frame mask (B, T) -> per-latent-frame mask (B, T'): a latent is True (generated) if
        any frame of its group is; end padding counts as generated."""
        f = self.cfg.temporal_downsample
        T = frame_mask.shape[1]
        mask = F.pad(frame_mask, (0, self.latent_frames(T) * f - T), value=True)  # (B, T'f)
        return rearrange(mask, "B (T f) -> B T f", f=f).any(dim=-1)  # (B, T')

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, T', C_lat, H', W')."""
        if x.ndim != 5 or x.shape[2] != self.cfg.in_channels:
            raise ValueError(f"VideoVAE.encode expects (B, T, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        T, H, W = x.shape[1], x.shape[3], x.shape[4]
        s, f = self.cfg.spatial_downsample, self.cfg.temporal_downsample
        x = rearrange(x, "B T C H W -> B C T H W")
        # Replicate padding: the end of time (future side, keeps causality) and bottom/right of space.
        x = F.pad(x, (0, -W % s, 0, -H % s, 0, -T % f), mode="replicate")  # (B, C, T+, H+, W+)
        moments = self.encoder(x)  # (B, 2*C_lat, T', H', W')
        mean, logvar = rearrange(moments, "B (two C) T H W -> two B T C H W", two=2)
        return mean, logvar.clamp(-30.0, 20.0)  # clamp keeps exp(logvar) finite early in training

    def decode(self, z: torch.Tensor, num_frames: int, out_hw: tuple[int, int]) -> torch.Tensor:
        """z: (B, T', C_lat, H', W') -> (B, num_frames, 3, H, W) with (H, W) = out_hw, cropped exactly."""
        Tl, h, w = z.shape[1], z.shape[3], z.shape[4]
        if self.latent_frames(num_frames) != Tl:
            raise ValueError(f"VideoVAE.decode: {Tl} latent frames cannot give num_frames={num_frames} (f={self.frames_per_latent})")
        if self.latent_hw(out_hw) != (h, w):
            raise ValueError(f"VideoVAE.decode: latent grid {(h, w)} does not match out_hw={tuple(out_hw)}")
        x = self.decoder(rearrange(z, "B T C H W -> B C T H W"))  # (B, 3, T'f, H+, W+)
        return rearrange(x[:, :, :num_frames, : out_hw[0], : out_hw[1]], "B C T H W -> B T C H W")

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Reparameterised draw from N(mean, exp(logvar))."""
        return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, 3, H, W) -> (recon (B, T, 3, H, W), mean, logvar)."""
        mean, logvar = self.encode(x)  # (B, T', C, H', W') each
        z = self.sample(mean, logvar) if sample_posterior else mean
        return self.decode(z, x.shape[1], (x.shape[3], x.shape[4])), mean, logvar


def vae_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float,
    *,
    recon_kind: str = "l1",
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (detached) for logging.

    x, recon: (B, T, 3, H, W) in [-1, 1]; mean, logvar: (B, T', C, H', W').
    recon: mean absolute (l1) or squared (l2) error per pixel value; kl: KL(q || N(0, I)) averaged
    per latent element (so kl_weight is relative to per-element means, not sums);
    perceptual: `perceptual(x_frames, recon_frames)` on (B*T, 3, H, W) frames, e.g. LPIPS, averaged.
    """
    if recon_kind == "l1":
        rec = (x - recon).abs().mean()
    elif recon_kind == "l2":
        rec = (x - recon).pow(2).mean()
    else:
        raise ValueError(f"vae_loss: recon_kind={recon_kind!r}; expected 'l1' or 'l2'")
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    total = rec + kl_weight * kl
    parts = {"recon": rec.detach(), "kl": kl.detach()}
    if perceptual is not None and perceptual_weight > 0:
        frames = lambda v: rearrange(v, "B T C H W -> (B T) C H W")  # noqa: E731
        p = perceptual(frames(x), frames(recon)).mean()
        total = total + perceptual_weight * p
        parts["perceptual"] = p.detach()
    parts["total"] = total.detach()
    return total, parts


def VAE_tiny(**kw) -> VideoVAE:
    """CPU/CI size: x4 in space by space-to-depth, one narrow res block per level (at x2, the stem
    is x2 and there is no strided level)."""
    stem = min(4, kw.get("spatial_downsample", 4))
    return VideoVAE(VAEConfig(**{"stem_patch": stem, "base_channels": 32, "max_channels": 64, **kw}))


def VAE_small(**kw) -> VideoVAE:
    return VideoVAE(VAEConfig(**{"stem_patch": 2, "base_channels": 64, "max_channels": 128, **kw}))


def VAE_base(**kw) -> VideoVAE:
    return VideoVAE(VAEConfig(**{"stem_patch": 1, "base_channels": 64, "max_channels": 256, "num_res_blocks": 2, **kw}))


VAE_models = {"tiny": VAE_tiny, "small": VAE_small, "base": VAE_base}
