"""Train a variant of a preset's DiT on a finished pipeline run's data and VAE: the preset's DiT
settings with some fields replaced, under a name of its own beside the run's model.

    python scripts/dit_variant.py --preset gpu --run-dir /tmp/gpurun/Breakout --game Breakout \
        --name dit-Breakout-T4only --set '{"horizon_choices": []}'

It reads `<run-dir>/data` and `<run-dir>/models/vae`, writes `<run-dir>/models/<name>` (and its
MLflow run in the run directory's store), and prints that path. GPU run 4 used it to measure a
lever of the DiT (training only the longest generation length) beside the pipeline's model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.run_all import PRESETS  # noqa: E402
from pipeline.train import train_dit_main  # noqa: E402
from models.config import config_from_dict  # noqa: E402
from workers.train_dit import TrainDiTConfig  # noqa: E402


def variant_config(preset: str, run_dir: str, game: str, name: str, overrides: dict) -> TrainDiTConfig:
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    run_dir = os.path.abspath(run_dir)
    vae = os.path.join(run_dir, "models", "vae")
    if not os.path.isfile(os.path.join(vae, "vae.json")):
        raise FileNotFoundError(f"no trained VAE at {vae}: run the pipeline's vae stage first")
    fields = {**PRESETS[preset]().dit, **overrides, "run_dir": run_dir, "data_root": os.path.join(run_dir, "data"),
              "game": game, "name": name, "vae_path": vae}
    return config_from_dict(TrainDiTConfig, fields)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--game", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--set", default="{}", help="JSON object of TrainDiTConfig fields to replace")
    a = p.parse_args()
    print(train_dit_main(variant_config(a.preset, a.run_dir, a.game, a.name, json.loads(a.set))))
