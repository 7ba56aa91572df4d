"""The API's settings, without torch: every choice and default a command or a notebook gives, where it is defined
(config.py's dataclasses and closed choices, presets.py's sizes, diffusion/sampling.py's sampling settings), and
durations. The CLI's options read their help from here, so that `diffuse --help` answers at once."""

from __future__ import annotations

import re

from .config import (ClassesMode, Config, DiffusionConfig, LRSchedule, ModelConfig, Objective, Precision,  # noqa: F401
                     SamplerName, Schedule, Spacing, Threshold, TrainConfig, Variance, check_choice, require_positive)
from .diffusion.sampling import INTERPOLATE_STEPS, RESAMPLE_JUMPS, SampleConfig, SamplerChoice  # noqa: F401
from .errors import ConfigError
from .presets import BUILTIN_IMAGE_SIZE, PRESETS  # noqa: F401

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SECONDS_PER = {unit: seconds for names, seconds in (("s sec secs second seconds", 1), ("m min mins minute minutes", 60),
                                                     ("h hr hrs hour hours", 3600), ("d day days", 86400))
                for unit in names.split()}


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d', compounds such as '1h30m' or '2h 15min', or plain seconds -> seconds."""
    parts, end = [], 0
    while match := _DURATION_PART.match(text, end):
        parts.append((float(match.group(1)), match.group(2).lower()))
        end = match.end()
    units = [unit for _, unit in parts]
    if (text[end:].strip() or not parts or any(unit not in _SECONDS_PER for unit in units if unit)
            or ("" in units and len(parts) > 1)):
        raise ConfigError(f"cannot read duration {text!r}; write e.g. 90s, 10m, 2h or 1h30m")
    seconds = sum(value * _SECONDS_PER.get(unit, 1) for value, unit in parts)
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be more than 0")
    return seconds
