"""The `smoke` preset: the whole job in minutes on 2 CPU cores (what the tests and CI run)."""

from __future__ import annotations

from pipeline.presets.base import Preset


def preset() -> Preset:
    """Minutes on 2 CPU cores: a one-iteration PPO agent, a few hundred steps, tiny models."""
    cpu = {"cpus_per_worker": 0.5}
    dit = {**cpu, "steps": 16, "batch_size": 4, "warmup_steps": 4,
           "checkpoint_every": 8, "log_every": 4, "horizon_choices": (1, 2, 4), "sample_steps": 4}
    return Preset(
        games=("Breakout", "Pong"),
        collect={"steps_per_game": 600, "steps_per_round": 300,
                 "cpus_per_env_runner": 0.5, "test_fraction": 0.3, "val_fraction": 0.2,
                 "agent": {"train_steps": 256, "train_batch_size": 256, "minibatch_size": 64, "num_epochs": 1}},
        vae={**cpu, "temporal_kernel": 1, "steps": 30, "batch_size": 2, "warmup_steps": 5,
             "checkpoint_every": 15, "log_every": 5, "val_every": 15, "val_windows": 4},
        dit=dit,
        evaluate={"horizons": (1, 2, 4), "max_windows": 8, "stride": 8, "batch_size": 4, "num_cpus": 0.5,
                  "figure_windows": 1, "idm_steps": 20, "idm_max_pairs": 256},
        other_policy={"random_repeat": 0.75, "steps_per_game": 300, "steps_per_round": 300,
                      "cpus_per_env_runner": 0.5, "test_fraction": 0.5, "val_fraction": 0.5},
        imagine={"heads_steps": 40, "heads_max_pairs": 256, "imagination_horizon": 8, "max_contexts": 32,
                 "train_steps": 64, "train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1,
                 "num_envs_per_env_runner": 4, "cpus_per_env_runner": 0.5,
                 "eval_max_steps": 150, "num_cpus": 0.5},
        # Table 3 as the gpu preset runs it, on one seed and one variant: the reference is the job's
        # own DiT and evaluation (scored alike, so it is not trained again); past + future actions train.
        sweeps=(("ablations", {"seeds": (0,), "eval_split": "test",
                               "overrides": {"game": "Breakout", "variant": ["future+embedding", "past_future+embedding"]},
                               "eval_max_windows": 8, "eval_stride": 8, "eval_batch_size": 4, "eval_num_cpus": 0.5,
                               "eval_idm_steps": 20, "eval_idm_max_pairs": 256}),),
    )
