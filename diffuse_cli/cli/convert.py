"""`diffuse import` and `diffuse export`: models in diffusers' folder layout, in and out (diffusers_format.py).

cli.py registers COMMANDS on its app (this module knows no app, so neither imports the other back); like every
command, each parses, calls the API, prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from .console import out

Folder = Annotated[Path, typer.Argument(help="A diffusers pipeline folder (model_index.json, unet/, scheduler/), or "
                                        "its unet/ folder.", show_default=False)]
ImportOut = Annotated[Optional[Path], typer.Option("--out", help="The run folder to write model.safetensors to. "
                                                   "\\[default: checkpoints/<folder name>]")]
Run = Annotated[Path, typer.Argument(help="A run folder or model.safetensors (a folder of runs: the newest).",
                                     show_default=False)]
ExportFolder = Annotated[Optional[Path], typer.Argument(help="The diffusers folder to write (new, or empty).",
                                                        show_default=False)]
ExportOut = Annotated[Optional[Path], typer.Option("--out", help="The same folder as an option, as import takes its "
                                                   "own.", show_default=False)]


def import_(folder: Folder, out_dir: ImportOut = None, device: opt.Device = "auto") -> None:
    """Bring in a diffusers UNet2DModel (safetensors only): our samplers, noise, explore and inspect on it."""
    from .. import api

    api.prepare_device(device)
    target = out_dir or Path("checkpoints") / folder.resolve().name
    model = api.import_diffusers(folder, target, device)
    m, d = model.config.model, model.config.diffusion
    out.print(f"imported {folder} ({model.info['imported_format']}): {m.image_size}x{m.image_size}, preset "
              f"{model.config.preset}, {d.schedule} schedule, T = {d.timesteps}, predicts {d.objective}; wrote "
              f"{model.path}", highlight=False)


def export(run: Run, folder: ExportFolder = None, out_dir: ExportOut = None) -> None:
    """Write a run's model as a diffusers folder that DDPMPipeline.from_pretrained loads, with no code of ours."""
    from .. import api
    from ..errors import UsageError

    if folder is not None and out_dir is not None and folder != out_dir:
        raise UsageError(f"two folders to write, {folder} and --out {out_dir}: give one")
    folder = folder if folder is not None else out_dir
    if folder is None:
        raise UsageError("give the diffusers folder to write: diffuse export RUN FOLDER (or --out FOLDER)")
    model = api.load(run, "cpu")
    api.export_diffusers(model, folder)
    names = model.config.model.class_names
    conditional = f"; class-conditional: pass class_labels (0..{len(names) - 1}: {', '.join(names)}; {len(names)}: " \
                  "no class) to the UNet, which DDPMPipeline does not" if names else ""
    d = model.config.distill
    student = (f"; a distilled student: DDIMPipeline.from_pretrained('{folder}')(num_inference_steps={d.steps}, "
               "eta=0) samples it as diffuse does") if d is not None else ""
    out.print(f"wrote {folder}/ (model_index.json, unet/, scheduler/) from {model.path}{conditional}{student}",
              highlight=False)


# (name, examples, function): what cli.py registers.
COMMANDS = [
    ("import", "Examples:\n\n  diffuse import ./ddpm-cifar10-32 --out checkpoints/cifar10\n\n"
               "  diffuse sample -n 16 --checkpoint checkpoints/cifar10   # our samplers on it", import_),
    ("export", "Examples:\n\n  diffuse export checkpoints/<run> ./my-model-diffusers\n\n"
               "  python -c \"from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('my-model-diffusers')\"",
     export),
]
