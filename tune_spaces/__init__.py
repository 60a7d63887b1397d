"""Ablation search spaces (Ray Tune param_spaces) for the paper's tables and extra sweeps."""

from tune_spaces.spaces import DEFAULTS, PARAMS, SPACES, space_for

__all__ = ["DEFAULTS", "PARAMS", "SPACES", "space_for"]
