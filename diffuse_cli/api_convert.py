"""The API's doors to diffusers: a UNet2DModel folder in as a Model, and a Model out as a folder its pipelines load
(formats/diffusers_format.py; docs/diffusers.md)."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .formats.files import MODEL_FILE
from .model import Model, PathLike
from .network.device import pick_device


def import_diffusers(folder: PathLike, out: PathLike | None = None, device: str = "auto") -> Model:
    """A diffusers UNet2DModel folder (docs/diffusers.md) as a Model, its network's output equal to UNet2DModel's;
    with `out`, saved there as a run folder's model.safetensors (a folder that holds one is refused)."""
    from .formats.diffusers_format import read_folder

    target = None if out is None else Path(out) / MODEL_FILE
    if target is not None and (target.exists() or Path(out).is_file()):
        raise UsageError(f"{out} already holds a model; name a new folder with {{out}}", "out")
    net, config, info = read_folder(folder)
    model = Model(net.to(pick_device(device)), config, info)
    if target is not None:
        model.save(target)
    return model


def export_diffusers(model: Model, folder: PathLike) -> Path:
    """Write `model` as a diffusers pipeline folder that DDPMPipeline.from_pretrained loads (docs/diffusers.md)."""
    from .formats.diffusers_format import write_folder

    return write_folder(model.net, model.config, model.info, folder)
