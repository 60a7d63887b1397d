"""Ablation search spaces (Ray Tune param_spaces) for the paper's tables and extra sweeps."""

from tune_spaces.spaces import (BUNDLES, CHOICES, REFERENCE, SPACES, SWEEPS, VARIANTS, expand_bundles, grid,
                                is_grid, space_for, swept)

__all__ = ["BUNDLES", "CHOICES", "REFERENCE", "SPACES", "SWEEPS", "VARIANTS", "expand_bundles", "grid", "is_grid",
           "space_for", "swept"]
