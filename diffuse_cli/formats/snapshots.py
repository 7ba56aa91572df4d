"""Post-hoc EMA's snapshots: a run folder's `ema/step_NNNNNNNN.safetensors`, each the run's power-function averages
at one step (training/posthoc_ema.py), in float16 as EDM2 keeps them, the config and facts in the header as a
checkpoint's are. Written atomically; a run keeps a few of them and deletes the others as it grows."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import Config
from ..errors import CheckpointError
from .checkpoint import _check_finite, _load_tensors, encode, read_header, read_metadata
from .files import atomic_write_bytes

SNAPSHOT_FORMAT = "diffuse/ema-snapshot"
SNAPSHOT_DIR = "ema"
SNAPSHOT_DTYPE = torch.float16  # half the disk of float32; a rebuilt EMA differs from float32's by its rounding
_NAME = re.compile(r"step_(\d{8})\.safetensors")


def snapshot_path(run: Path, step: int) -> Path:
    return run / SNAPSHOT_DIR / f"step_{step:08d}.safetensors"


def save_snapshot(run: Path, step: int, averages: Sequence[torch.nn.Module], config: Config,
                  info: dict[str, Any]) -> None:
    """Write the averages at `step` (σ_rel from config.train.posthoc_ema, in order) as one float16 snapshot."""
    tensors = {f"{sigma_rel:.4f}/{k}": v.to(SNAPSHOT_DTYPE) if v.is_floating_point() else v
               for sigma_rel, average in zip(config.train.posthoc_ema, averages)
               for k, v in average.state_dict().items()}
    path = snapshot_path(run, step)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, encode(tensors, SNAPSHOT_FORMAT, config, {**info, "step": step}))


def list_snapshots(run: Path) -> dict[int, Path]:
    """The run's snapshots by step, oldest first."""
    folder = run / SNAPSHOT_DIR
    found = {int(m.group(1)): folder / name for name in (os.listdir(folder) if folder.is_dir() else [])
             if (m := _NAME.fullmatch(name))}
    return dict(sorted(found.items()))


def load_snapshot(path: Path) -> tuple[Config, dict[str, Any], dict[float, dict[str, torch.Tensor]]]:
    """(config, facts, {σ_rel: the average's weights in float32}) of one snapshot (facts["step"]: its step);
    CheckpointError if unusable."""
    header = read_header(path)
    config, info = read_metadata(path, SNAPSHOT_FORMAT, header)
    tensors = _load_tensors(path)
    _check_finite(path, tensors)
    averages: dict[float, dict[str, torch.Tensor]] = {}
    try:
        for key, value in tensors.items():
            sigma_rel, name = key.split("/", 1)
            averages.setdefault(float(sigma_rel), {})[name] = value.float() if value.is_floating_point() else value
        info["step"] = int(info["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a snapshot diffuse wrote: {e}") from None
    return config, info, averages
