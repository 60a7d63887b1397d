"""The `gpu` preset: one GPU box; its runs are the reported results (docs/results.md)."""

from __future__ import annotations

from pipeline.presets.base import Preset


def preset() -> Preset:
    """One GPU box (16 cores, one H100 or H200), about 20 minutes a game: the reported runs.

    - Collection: a briefly trained PPO agent records 120k steps; 20 % of the episodes are test
      and 20 % val (split by episode hash), so that intervals over held-out episodes mean something
      (Breakout: 161 val and 140 test episodes; collect warns below 30).
    - Step budgets, not clocks, so that runs on H100 and H200 pool into one table: a frame-wise L2
      VAE (4,000 steps; it exports the EMA weights of its best check on fixed training windows,
      since its loss can spike late), then one DiT for generation lengths 1, 2 and 4 on 64 clips
      a step (2,000 steps), both with a linear learning-rate cooldown over their last 20 %.
    - 4 Euler steps (as good as 8 at half the cost); evaluation at T = 1, 2, 4 on 256 test
      windows spread over the test episodes. `docs/history.md` has the measurements behind each
      choice.
    - The other_policy stage scores each seed again on a random policy's play (the action tests'
      other test set); the imagine stage trains PPO in each seed's world model and scores it in the
      real game; the sweep stage trains the DiTs of Tables 3 and 4 (three variants x three seeds,
      the reference variant's seeds of the job served by its own evaluations) on the same
      collection and VAE. `--stages collect vae dit evaluate` is Table 2 alone."""
    gpu1 = {"cpus_per_worker": 4, "use_gpu": True}
    return Preset(
        games=("Breakout",),
        collect={"steps_per_game": 120_000, "steps_per_round": 4000, "num_env_runners": 14,
                 "cpus_per_env_runner": 1.0, "test_fraction": 0.2, "val_fraction": 0.2,
                 "agent": {"train_steps": 64_000, "train_batch_size": 8000, "minibatch_size": 500, "num_epochs": 2,
                           "learner_device": "auto", "learner_threads": 8}},
        vae={**gpu1, "vae_preset": "small", "latent_channels": 8, "temporal_kernel": 1, "recon_kind": "l2",
             "steps": 4_000,
             "batch_size": 16, "clip_length": 4, "lr": 4e-4, "warmup_steps": 200, "lr_cooldown": 0.2, "checkpoint_every": 1000,
             "log_every": 50, "val_every": 500},
        dit={**gpu1, "dit_preset": "S", "patch_size": (1, 4, 4), "steps": 2_000,
             "batch_size": 64, "horizon_choices": (1, 2, 4), "sample_steps": 4, "lr": 3e-4,
             "warmup_steps": 300, "lr_cooldown": 0.2, "checkpoint_every": 1000, "log_every": 50},
        evaluate={"horizons": (1, 2, 4), "max_windows": 256, "stride": 8, "batch_size": 32,
                  "num_cpus": 4, "use_gpu": True},
        # The other-policy test set: a random policy holding its action with probability 0.75, 40k
        # steps, half of the episodes test and half val (collect warns below 30 each), never trained on.
        other_policy={"random_repeat": 0.75, "steps_per_game": 40_000, "steps_per_round": 4000,
                      "num_env_runners": 14, "cpus_per_env_runner": 1.0, "test_fraction": 0.5, "val_fraction": 0.5},
        # 60k imagined agent steps: about as many as the collection's training split holds; at the
        # measured 87 steps/s (pixel rollout, 256 games) 12 minutes
        imagine={"train_steps": 60_000, "train_batch_size": 8192, "minibatch_size": 512,
                 "num_epochs": 2, "num_envs_per_env_runner": 256, "cpus_per_env_runner": 2,
                 "gpus_per_env_runner": 0.5, "learner_gpus": 0.5, "num_cpus": 4,
                 "use_gpu": True},
        # Tables 3 and 4: the preset's DiT with only action_mode or action_encoder changed, 3 seeds, on
        # the job's collection and VAE, one trial at a time; scored on test (records pooled by
        # `python -m pipeline.results ablations`); set sweep eval_split "val" while choosing settings.
        sweeps=(("ablations", {"seeds": (0, 1, 2), "use_gpu": True, "eval_split": "test", "eval_max_windows": 256,
                               "eval_stride": 8, "eval_batch_size": 32, "eval_num_cpus": 4, "eval_lpips": True,
                               "eval_idm_steps": 2000, "eval_idm_max_pairs": 8192, "max_concurrent_trials": 1,
                               "trials_per_gpu": 1}),),
    )
