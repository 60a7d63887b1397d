"""The job's presets, one module per preset (`smoke`, `gpu`, `paper`), each listing only the
settings that differ from the stage configs' defaults; `base` holds the `Preset` type, `--set`
overrides, training seeds and the versions that pool runs."""

from __future__ import annotations

from typing import Callable

from pipeline.presets import gpu, paper, smoke
from pipeline.presets.base import (Preset, imagine_version, other_policy_config, preset_version, resolved_settings,
                                   section_configs, with_overrides, with_seed)

PRESETS: dict[str, Callable[[], Preset]] = {"smoke": smoke.preset, "gpu": gpu.preset, "paper": paper.preset}

__all__ = ["PRESETS", "Preset", "imagine_version", "other_policy_config", "preset_version", "resolved_settings",
           "section_configs", "with_overrides", "with_seed"]
