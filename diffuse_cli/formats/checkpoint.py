"""Checkpoints: safetensors files whose header carries the config and facts as JSON; nothing executable.

`model.safetensors` holds the weights to sample with (the EMA weights) and is all that
sampling needs. `training_state.safetensors` holds what resuming needs besides: the online
weights, the EMA weights and the optimizer state. Both are written to a temporary file and
renamed into place, so a crash leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..version import __version__
from ..config import Config, ConfigError, config_from_json, config_to_json, to_dict, validate_diffusion, validate_model
from ..errors import CheckpointError
from .files import LOSS_PLOT, MODEL_FILE, atomic_write_bytes, newest

MODEL_FORMAT = "diffuse/model"
STATE_FORMAT = "diffuse/training-state"
FORMAT_VERSION = 1
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # the safetensors format's dtypes


def encode(tensors: dict[str, torch.Tensor], fmt: str, config: Config, info: dict[str, Any]) -> bytes:
    metadata = {"format": fmt, "format_version": str(FORMAT_VERSION), "diffuse_version": __version__,
                "config": config_to_json(config), "info": json.dumps(info, sort_keys=True)}
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The safetensors JSON header alone (tensor table and metadata), checked against the file size."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the .safetensors file inside it")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: empty or truncated ({size} bytes), not a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (or truncated): bad header length")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # (nested past Python's recursion limit)
        raise CheckpointError(f"{path}: not a safetensors file: header is not JSON") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file: header is not a JSON object")
    _check_table(path, header, size - 8 - n)
    return header


def _check_table(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """The header's tensor table as safetensors defines it, before anything is read or allocated by it: each
    entry a dtype, a shape of counts and [begin, end) offsets inside the file, of the size the shape needs;
    the metadata strings."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: corrupt header: __metadata__ is not a table of strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in DTYPE_BYTES
              and isinstance(entry.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
              and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} is not described as safetensors does")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end or end > data_bytes:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} lies at bytes {begin}..{end} of "
                                  f"{data_bytes}")
        if end - begin != DTYPE_BYTES[entry["dtype"]] * math.prod(entry["shape"]):
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} has {end - begin} bytes for its shape "
                                  f"{entry['shape']}")


def read_metadata(path: str | os.PathLike, fmt: str = MODEL_FORMAT,
                  header: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any]]:
    """(config, info) from a diffuse checkpoint's header (read here unless given), without loading any tensor."""
    meta = (header if header is not None else read_header(path)).get("__metadata__") or {}
    if meta.get("format") != fmt:
        found = f"a {meta['format']!r} file" if "format" in meta else "a safetensors file from another program"
        hint = (f"; the run's model is {Path(path).with_name(MODEL_FILE)}"
                if fmt == MODEL_FORMAT and meta.get("format") == STATE_FORMAT else "")
        raise CheckpointError(f"{path}: not a diffuse {fmt.split('/')[1]} checkpoint ({found}){hint}")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r} "
                              f"(written by diffuse {meta.get('diffuse_version', '?')}); this diffuse "
                              f"{__version__} reads format {FORMAT_VERSION}: upgrade diffuse")
    try:
        config = config_from_json(meta["config"])
        validate_model(config.model)
        validate_diffusion(config.diffusion)
        info = json.loads(meta.get("info", "{}"))
        if not isinstance(info, dict):
            raise TypeError("info is not a JSON object")
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable config in header: {e}") from None
    return config, info


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type on corrupt data
        raise CheckpointError(f"{path}: corrupt tensor data: {e}") from None


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Weights with NaN or infinity would sample black or garbage images without a word."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]}); "
                              "did the training that wrote it diverge? Use an earlier checkpoint")


def _check_shapes(path: Path, expected: dict[str, torch.Size], found: dict[str, list[int]]) -> None:
    """The tensors a config implies against those a file holds, by name and shape."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    wrong = sorted(k for k in set(expected) & set(found) if list(expected[k]) != list(found[k]))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing" if missing else "", f"{len(unexpected)} unexpected" if unexpected else "",
                 f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})" if wrong else ""]
        raise CheckpointError(f"{path}: the weights do not match the config in its header: "
                              + ", ".join(p for p in parts if p))


def _expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Parameter shapes of the U-Net a config describes, built on the meta device (no memory)."""
    from ..network.unet import UNet

    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(config.model).state_dict().items()}


def _header_shapes(header: dict[str, Any], prefix: str = "") -> dict[str, list[int]]:
    return {k[len(prefix):]: v.get("shape", []) for k, v in header.items()
            if k != "__metadata__" and k.startswith(prefix) and isinstance(v, dict)}


def save_model(path: str | os.PathLike, model: torch.nn.Module, config: Config, info: dict[str, Any]) -> None:
    """Write the sampling weights and their config atomically."""
    atomic_write_bytes(path, encode(model.state_dict(), MODEL_FORMAT, config, info))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(UNet in eval mode, config, info) from a model checkpoint; CheckpointError if unusable."""
    from ..network.unet import UNet

    path = Path(path)
    header = read_header(path)
    config, info = read_metadata(path, MODEL_FORMAT, header)
    _check_shapes(path, _expected_shapes(config), _header_shapes(header))
    weights = _load_tensors(path)
    _check_finite(path, weights)
    model = UNet(config.model)
    model.load_state_dict(weights)
    return model.to(device).eval(), config, info


def save_training_state(path: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, config: Config, info: dict[str, Any],
                        averages: Sequence[torch.nn.Module] = ()) -> None:
    """Write everything resuming needs (weights, EMA, optimizer, post-hoc EMA's averages) atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for i, average in enumerate(averages):
        tensors |= {f"average{i}.{k}": v for k, v in average.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        tensors |= {f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()}
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in group.items()} for group in opt["param_groups"]]
    info = {**info, "param_groups": groups}
    atomic_write_bytes(path, encode(tensors, STATE_FORMAT, config, info))


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, averages: Sequence[torch.nn.Module] = ()) -> dict[str, Any]:
    """Load weights, EMA, optimizer state and post-hoc EMA's averages in place; return the info dict (step and so
    on), with "averages": False where the state holds none (written before post-hoc EMA, or without it)."""
    path = Path(path)
    header = read_header(path)
    _, info = read_metadata(path, STATE_FORMAT, header)
    modules = {"model": model, "ema": ema} | {f"average{i}": a for i, a in enumerate(averages)}
    info["averages"] = bool(averages) and any(k.startswith("average0.") for k in header)
    if not info["averages"]:
        modules = {k: m for k, m in modules.items() if not k.startswith("average")}
    for name, module in modules.items():
        _check_shapes(path, {k: v.shape for k, v in module.state_dict().items()}, _header_shapes(header, f"{name}."))
    tensors = _load_tensors(path)
    _check_finite(path, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {"optim": {}} | {name: {} for name in modules}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head not in parts and not (head.startswith("average") and not info["averages"]):
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        parts.setdefault(head, {})[rest] = value
    for name, module in modules.items():
        module.load_state_dict(parts[name])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in parts["optim"].items():
        index, _, name = key.partition(".")
        if not (index.isascii() and index.isdigit()):  # a flipped byte in a name is a corrupt file
            raise CheckpointError(f"{path}: unexpected tensor 'optim.{key}'")
        state.setdefault(int(index), {})[name] = value
    # What runs the step is this machine's choice, not the saved run's (fused on CUDA, say, now on MPS),
    # and a CUDA graph reads the learning rate from the tensor it was captured with.
    mine = [{k: v for k, v in group.items() if k in ("fused", "foreach", "capturable") or torch.is_tensor(v)}
            for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict({"state": dict(sorted(state.items())), "param_groups": info.pop("param_groups")})
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not match the model: {e}") from None
    for group, kept in zip(optimizer.param_groups, mine):
        for k, v in kept.items():
            group[k] = v.fill_(group[k]) if torch.is_tensor(v) else v  # tensors keep their place, take the saved value
    _match_layouts(optimizer)
    return info


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout. Files hold contiguous tensors, and
    the fused AdamW kernel pairs elements by memory position, so a contiguous moment beside a
    channels_last weight would update the wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def describe(path: str | os.PathLike) -> tuple[dict[str, Any], Config]:
    """What a checkpoint holds, from its header alone: (facts as JSON-able data, its config)."""
    path = Path(path)
    header = read_header(path)
    fmt = (header.get("__metadata__") or {}).get("format")
    config, info = read_metadata(path, fmt if fmt in (MODEL_FORMAT, STATE_FORMAT) else MODEL_FORMAT, header)
    info.pop("param_groups", None)
    tensors = sum(1 for k in header if k != "__metadata__")
    facts = {"file": str(path), "format": fmt, "file_size_bytes": path.stat().st_size, "tensors": tensors,
             "preset": config.preset, **info, "config": to_dict(config)}
    if (plot := path.parent / LOSS_PLOT).exists():
        facts["loss_plot"] = str(plot)
    return facts, config


def find_latest(root: str | os.PathLike = "checkpoints") -> Path:
    """The most recently written model.safetensors below root."""
    root = Path(root)
    found = newest(root, MODEL_FILE)
    if found is None and root == Path("checkpoints"):
        raise CheckpointError("no checkpoint found under checkpoints/; train one with `diffuse train`, "
                              "or pass {checkpoint} PATH", "checkpoint")
    if found is None:
        raise CheckpointError(f"{root}: no {MODEL_FILE} in this folder or below it; give a run folder or a "
                              ".safetensors file")
    return found


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """A file as given, a run folder's model.safetensors, or the newest below a folder (./checkpoints by default)."""
    if path is None:
        return find_latest()
    path = Path(path)
    if not path.is_dir():
        return path
    return path / MODEL_FILE if (path / MODEL_FILE).exists() else find_latest(path)


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model", "read_metadata", "read_header", "describe",
           "save_training_state", "load_training_state", "find_latest", "resolve_checkpoint"]
