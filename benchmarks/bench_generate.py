"""Generation throughput of the world model: frames/s end to end, uint8 in -> uint8 out.

Times `WorldModel.predict` (encode the condition frames, Euler-sample the future latents with the
ST-DiT, decode with the VAE, back to uint8 on the host) for each batch size and number of sampling
steps. frames/s = batch x generated frames / seconds per call. A saved world model is loaded from
`--world-model` (what evaluation runs); without one, random weights of the chosen presets are
used, which cost exactly the same.

    python -m benchmarks.bench_generate --dit-preset B --vae-preset small --batch-sizes 1 256 --sample-steps 8
    python -m benchmarks.bench_generate --world-model runs/x/world_model --batch-sizes 1 256 --compile eager compile
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import (
    GpuBusySampler, device_name, markdown_table, pick_device, profile_table, time_calls, warm_up,
    write_rows,
)
from pipeline.cli import parse_config
from models.rectified_flow import EulerSampler, EulerSamplerConfig
from models.stdit import STDiT_models
from models.vae import VAE_models
from workers.train_common import autocast
from models.action_encoder import ACTION_MODES
from workers.world_model import WorldModel, load_world_model

COMPILE_MODES = ("eager", "compile", "cudagraphs")
"""eager; compile = torch.compile (default mode) of the ST-DiT;
cudagraphs = the same with mode="reduce-overhead", which replays each shape's kernels as one CUDA
graph and so removes the per-kernel launch cost that bounds a single stream."""


@dataclass(frozen=True)
class BenchGenerateConfig:
    world_model: str = ""
    """Saved world-model directory (workers.world_model.save_world_model); empty = random weights."""
    dit_preset: str = "B"
    """ST-DiT preset of the random model."""
    vae_preset: str = "small"
    """VAE preset of the random model."""
    spatial_downsample: int = 4
    temporal_downsample: int = 1
    latent_channels: int = 4
    temporal_kernel: int = 3
    """Temporal extent of the random VAE's convolutions (1 = frame-wise, as the `gpu` preset trains)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the random ST-DiT (the `gpu` preset trains (1, 4, 4))."""
    n_cond: int = 4
    """Condition frames of the random model."""
    horizon: int = 4
    """Trained generation length T of the random model (frames per chunk)."""
    action_mode: str = "future"
    num_actions: int = 18
    frames: int = 0
    """Frames generated per predict call; 0 = the model's trained horizon (one chunk)."""
    batch_sizes: tuple[int, ...] = (1, 256)
    sample_steps: tuple[int, ...] = (8,)
    """Euler steps per chunk (use the evaluation's setting)."""
    compile: tuple[str, ...] = ("eager",)
    """Any of COMPILE_MODES: "eager", "compile", "cudagraphs"."""
    bf16: bool = True
    """bf16 autocast around predict (GPU only)."""
    height: int = 210
    width: int = 160
    warmup: int = 2
    iters: int = 5
    device: str = "auto"
    profile: bool = False
    """Print a torch.profiler table of the top ops of the first setting's predict calls."""
    out: str = ""
    """Write the rows here too: .csv, or JSON otherwise."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dit_preset not in STDiT_models:
            raise ValueError(f"BenchGenerateConfig.dit_preset={self.dit_preset!r}; presets: {sorted(STDiT_models)}")
        if self.vae_preset not in VAE_models:
            raise ValueError(f"BenchGenerateConfig.vae_preset={self.vae_preset!r}; presets: {sorted(VAE_models)}")
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"BenchGenerateConfig.action_mode={self.action_mode!r}; expected one of {ACTION_MODES}")
        bad = [c for c in self.compile if c not in COMPILE_MODES]
        if bad:
            raise ValueError(f"BenchGenerateConfig.compile: unknown {bad}; expected {COMPILE_MODES}")


def random_world_model(cfg: BenchGenerateConfig, device: torch.device) -> WorldModel:
    """Untrained world model of the configured presets (the DiT's zero-initialised output layer
    predicts zero velocity, so sampling is well defined; the cost is that of a trained model)."""
    vae = VAE_models[cfg.vae_preset](spatial_downsample=cfg.spatial_downsample,
                                     temporal_downsample=cfg.temporal_downsample, latent_channels=cfg.latent_channels,
                                     temporal_kernel=cfg.temporal_kernel)
    dit = STDiT_models[cfg.dit_preset](in_channels=cfg.latent_channels, num_actions=cfg.num_actions,
                                       patch_size=tuple(cfg.patch_size))
    return WorldModel(vae.requires_grad_(False), dit.requires_grad_(False), latent_scale=1.0, n_cond=cfg.n_cond,
                      horizon=cfg.horizon, action_mode=cfg.action_mode).to(device)


def compiled(wm: WorldModel, mode: str = "compile") -> WorldModel:
    """The same weights with torch.compile on the ST-DiT, which runs once per Euler step (the VAE's
    encode and decode run once per chunk and stay eager: inductor's CPU code generation fails on the
    encoder's padded input at batch sizes above 1 in torch 2.13). `mode` "cudagraphs" compiles with
    mode="reduce-overhead" (CUDA graphs). dynamic=False: each batch size gets its own graph."""
    kw: dict = {"dynamic": False}
    if mode == "cudagraphs":
        kw["mode"] = "reduce-overhead"
    return WorldModel(wm.vae, torch.compile(wm.dit, **kw), latent_scale=wm.latent_scale, n_cond=wm.n_cond,
                      horizon=wm.horizon, action_mode=wm.action_mode, sampler=wm.sampler.cfg)


def main(cfg: BenchGenerateConfig) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the device and a Markdown table, returns the rows."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    base = load_world_model(cfg.world_model, device) if cfg.world_model else random_world_model(cfg, device)
    frames = cfg.frames or base.horizon
    source = cfg.world_model or f"random DiT {cfg.dit_preset} + VAE {cfg.vae_preset}"
    params = sum(p.numel() for p in base.dit.parameters()) + sum(p.numel() for p in base.vae.parameters())
    print(f"device: {device_name(device)}; torch {torch.__version__}; bf16 autocast "
          f"{'on' if cfg.bf16 and device.type == 'cuda' else 'off'}; model: {source} ({params / 1e6:.1f}M params, "
          f"n_cond {base.n_cond}, trained horizon {base.horizon}); {frames} frames per call")
    g = torch.Generator().manual_seed(cfg.seed)
    rows, profiled = [], not cfg.profile
    for mode in cfg.compile:
        wm = base if mode == "eager" else compiled(base, mode)
        for steps in cfg.sample_steps:
            wm.sampler = EulerSampler(EulerSamplerConfig(num_steps=steps))
            for B in cfg.batch_sizes:
                row: dict[str, Any] = {"compile": mode, "sample_steps": steps, "batch": B, "frames_per_call": frames}
                # Host uint8 in, host uint8 out: what a caller of predict hands over and gets back.
                cond = torch.randint(0, 256, (B, wm.n_cond, cfg.height, cfg.width, 3), dtype=torch.uint8, generator=g)
                actions = torch.randint(0, cfg.num_actions, (B, wm.num_actions_for(frames)), generator=g)
                gen = torch.Generator(device=device).manual_seed(cfg.seed)

                def call() -> torch.Tensor:
                    with autocast(device, cfg.bf16):
                        return wm.predict(cond, actions, frames, generator=gen)

                try:
                    warmup_s = warm_up(call, device, cfg.warmup)
                    with GpuBusySampler(device) as busy:
                        t = time_calls(call, device, cfg.iters)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({**row, "note": "CUDA out of memory"})
                    continue
                except Exception as e:  # a compile mode that fails here is a row that says why, not a lost table
                    if mode == "eager":
                        raise
                    rows.append({**row, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    continue
                row.update(ms_per_call=1e3 * t["mean_s"], min_ms_per_call=1e3 * t["min_s"],
                           frames_per_s=B * frames / t["mean_s"], gpu_busy_pct=busy.mean, warmup_s=warmup_s)
                rows.append(row)
                if not profiled:
                    print(f"\nprofile: {mode}, {steps} steps, batch {B}\n{profile_table(call, device)}\n")
                    profiled = True
    columns = ["compile", "sample_steps", "batch", "frames_per_call", "ms_per_call", "min_ms_per_call",
               "frames_per_s", "gpu_busy_pct", "warmup_s"] + (["note"] if any("note" in r for r in rows) else [])
    print(markdown_table(rows, columns))
    print("targets: >= 1,000 frames/s batched, >= 60 frames/s at batch 1 (single stream)")
    if cfg.out:
        print(f"wrote {write_rows(rows, cfg.out, {'device': device_name(device), 'model': source, 'config': repr(cfg)})}")
    return rows


if __name__ == "__main__":
    main(parse_config(BenchGenerateConfig, description=__doc__))
