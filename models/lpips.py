"""LPIPS (AlexNet backbone, linear layers v0.1) in plain PyTorch.

The perceptual distance of Zhang et al. (2018): both images go through an ImageNet AlexNet, the
activations after each of its five ReLUs are unit-normalised along channels, their squared
difference is weighted per channel by a learned 1x1 layer, averaged over space and summed over
the five layers.

The weights are never fetched at run time (the machines that run this have no network):
`python scripts/setup_lpips.py` converts them once into a torch state dict at `weights_path()`,
and `LPIPS()` refuses to start without that file rather than fall back to a random backbone,
whose scores look plausible but mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_ENV = "AWM_LPIPS_WEIGHTS"
DEFAULT_WEIGHTS = Path("~/.cache/atari-world-model/lpips_alex_v0.1.pt")
SETUP_COMMAND = "python scripts/setup_lpips.py"

# (out channels, kernel, stride, padding, max-pool before this conv) for AlexNet's five convs,
# as in the ImageNet model the LPIPS v0.1 linear layers were trained on.
ALEXNET_CONVS = (
    (64, 11, 4, 2, False),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, True),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, False),
)


def weights_path() -> Path:
    """Where the converted weights live: $AWM_LPIPS_WEIGHTS, else ~/.cache/atari-world-model/."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS).expanduser()


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk; returns the activation after each of its five ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        in_ch = 3
        convs = []
        for out_ch, k, s, p, _ in ALEXNET_CONVS:
            convs.append(nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p))
            in_ch = out_ch
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for conv, (*_, pool_before) in zip(self.convs, ALEXNET_CONVS):
            if pool_before:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS distance, AlexNet v0.1. Frozen, eval mode, weights from `weights_path()`.

    forward(x, y): x, y (N, 3, H, W) RGB floats in [-1, 1] -> distance (N,). No resizing: the
    score depends on the resolution it is taken at, which callers must report.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        # ImageNet statistics expressed for inputs in [-1, 1].
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = AlexNetFeatures()
        self.lins = nn.ModuleList(
            nn.Conv2d(out_ch, 1, 1, bias=False) for out_ch, *_ in ALEXNET_CONVS
        )
        path = Path(weights).expanduser() if weights is not None else weights_path()
        self.load_state_dict(load_weights(path))
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants two (N, 3, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        feats = self.features((torch.cat([x, y]) - self.shift) / self.scale)
        dist = x.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            # Unit length along channels; the epsilon matches the reference implementation.
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f[:n], f[n:]
            dist = dist + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # (N,)
        return dist


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes a weights file must hold."""
    model = nn.Module()
    model.features = AlexNetFeatures()
    model.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for o, *_ in ALEXNET_CONVS)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(sd: dict[str, Tensor], source: str) -> None:
    """Raise ValueError naming `source` unless `sd` is exactly a finite LPIPS AlexNet state dict."""
    want = expected_shapes()
    if set(sd) != set(want):
        raise ValueError(
            f"{source}: keys differ from LPIPS AlexNet: missing {sorted(set(want) - set(sd))}, "
            f"unexpected {sorted(set(sd) - set(want))}"
        )
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape or not torch.isfinite(sd[k]).all():
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)} (want {shape}) or non-finite values")


def require_weights(path: str | Path | None = None) -> Path:
    """The weights' file (`path`, else `weights_path()`), or a FileNotFoundError naming it and the
    setup command. Jobs that will score call it before they collect or train, so that a missing
    file stops them at once rather than after the training it would have scored."""
    path = Path(path).expanduser() if path else weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS AlexNet weights not found at {path}. Prepare them once with `{SETUP_COMMAND}` "
            f"(set ${WEIGHTS_ENV} to use another location)."
        )
    return path


def load_weights(path: Path) -> dict[str, Tensor]:
    path = require_weights(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    check_state_dict(sd, str(path))
    return sd
