"""The `paper` preset: the paper's scale, for a GPU cluster."""

from __future__ import annotations

from pipeline.presets.base import Preset


def preset() -> Preset:
    """The paper's scale: 1M recorded steps per game, a large ST-DiT; a GPU cluster."""
    gpus = {"num_workers": 8, "cpus_per_worker": 8, "use_gpu": True}
    return Preset(
        games=("Breakout", "Pong", "DemonAttack"),
        collect={"num_env_runners": 32,
                 "agent": {"train_steps": 10_000_000}},
        vae={**gpus, "vae_preset": "base", "latent_channels": 8, "steps": 100_000, "clip_length": 16},
        dit={**gpus, "dit_preset": "B", "steps": 200_000, "batch_size": 32, "sample_steps": 16},
        evaluate={"horizons": (1, 2, 4, 8, 16), "max_windows": 2048, "use_gpu": True, "num_cpus": 4},
        sweeps=tuple((space, {"seeds": (0, 1, 2), "use_gpu": True, **({"games": ("Breakout",)} if space != "table2" else {})})
                     for space in ("table2", "table3", "table4")),  # the paper's Tables 3 and 4 are Breakout only
    )
