"""A sampling run written to a folder, as `diffuse sample` does it: the request checked and the folder too before any
work, each batch saved as it is drawn, grid.png (and a trajectory) at the end, and what was done in words."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .diffusion.denoiser import SampleHooks, class_labels
from .diffusion.sampling import SampleConfig
from .images.outputs import SampleFolder, Trajectory, check_folder, layout
from .model import Model, PathLike


def sample_folder_name(model: Model, settings: SampleConfig, init: PathLike | None = None,
                       mask: PathLike | None = None) -> Path:
    """samples/<run>-step<N>-<sampler>-<steps>steps-seed<seed>[-<classes>-w<guidance>][-init-<name>-s<strength>]
    [-mask-<name>-jumps<J>]: more training, or other settings, make a new folder."""
    trained = f"-step{model.info['step']}" if isinstance(model.info.get("step"), int) else ""
    s = settings
    asked = f"-{'-'.join(s.classes)}-w{s.guidance:g}" if s.classes else ""
    edited = f"-init-{Path(init).stem}-s{s.strength:g}" if init is not None else ""
    edited += f"-mask-{Path(mask).stem}-jumps{s.jumps()}" if mask is not None else ""
    how = f"{s.sampler.name}-{s.sampler.steps}steps"
    return Path("samples") / f"{model.path.parent.name}{trained}-{how}-seed{s.seed}{asked}{edited}"


class SampleRun:
    """n images (of each class asked, of each init) from `model` into `folder` (None: the name sample_folder_name
    gives), editing `init` (inside `mask`) when given; `written` counts the images saved so far."""

    def __init__(self, model: Model, n: int | None = None, settings: SampleConfig = SampleConfig(),
                 folder: PathLike | None = None, init: PathLike | None = None, mask: PathLike | None = None,
                 trajectory: bool = False):
        self.model, self.init, self.mask = model, init, mask
        self.edit = None if init is None and mask is None else model.edit_inputs(init, mask)
        self.n = n or (1 if self.edit is not None and Path(init).is_dir() else 16)
        self.request = model.request(self.n, settings, self.edit)
        self.settings = self.request.settings
        self.folder = check_folder(Path(folder) if folder else sample_folder_name(model, self.settings, init, mask))
        self.trajectory = Trajectory() if trajectory else None
        asked = class_labels(model.config, settings.classes, self.n)
        classes = None if asked is None else [model.config.model.class_names[k] for k in asked.tolist()]
        heads = None
        if self.edit is not None:
            heads = self.edit.images if self.edit.generate is None else torch.where(
                self.edit.generate, 128, self.edit.images).to(torch.uint8)
        suffixes, row, heads = layout(self.n, classes, None if self.edit is None else self.edit.names, heads)
        self.files = SampleFolder(self.folder, self.request.total, suffixes, row, heads, self.trajectory)
        self.notes = list(self.edit.notes) if self.edit else []  # what reading the edit's inputs changed
        self.elapsed, self.grid, self.classes = 0.0, "", classes

    @property
    def written(self) -> int:
        return self.files.written

    def run(self, hooks: SampleHooks = SampleHooks()) -> Path:
        """Draw and save every batch as it comes (an interruption keeps what was made), then the grid; returns the
        folder. The trajectory, where one is kept, is the hooks' callback."""
        start = time.perf_counter()
        if self.trajectory is not None:
            hooks = SampleHooks(hooks.progress, self.trajectory, hooks.log, hooks.cuda_graph)
        for batch in self.model.draw(self.request, hooks):
            self.files.add(batch)
        self.grid = self.files.finish()
        self.elapsed = time.perf_counter() - start
        return self.folder

    def summary(self) -> list[str]:
        """What was drawn, how, how fast, and where it went, in lines."""
        s, model, total = self.settings, self.model, self.written
        doubled = ", each on the batch twice over (guidance)" if s.guidance != 1 else ""
        lines = [f"{s.sampler.name}, {s.sampler.steps} steps, {self.request.nfe(model.schedule())} network calls per "
                 f"batch{doubled}, {self.elapsed / max(total, 1) * 1000:.0f} ms per image ({self.elapsed:.1f} s in all) "
                 f"from {model.path}"]
        if self.edit is not None:
            lines.append(self.edit_line())
        names = dict.fromkeys(self.classes or [])
        drawn = f"all {next(iter(names))}" if len(names) == 1 else f"{self.n} of each of {', '.join(names)}"
        classes = f" ({drawn}, guidance {s.guidance:g})" if names else ""
        lines.append(f"wrote {total} image{'s' * (total != 1)}{classes} and {self.grid} to {self.folder}/"
                     + (" (+ trajectory.png, trajectory.gif)" if self.trajectory else ""))
        return lines

    def edit_line(self) -> str:
        """What an edit did, in a line."""
        s, edit, T = self.settings, self.edit, self.model.config.diffusion.timesteps
        plan = self.request.plan(self.model.schedule())
        count = f"{len(edit.images)} images of {self.init}/" if len(edit.images) > 1 else str(self.init)
        said = f"edited {count}: " + (f"SDEdit at strength {s.strength:g}, noised to t = {plan.k} of {T} and denoised "
                                      f"in {len(plan.timesteps)} of the {s.sampler.steps} steps" if plan.k < T
                                      else "from pure noise")
        if self.mask is not None:
            jumps = s.jumps()
            said += (f"; inpainted {edit.generated_share():.0%} of the pixels (the white of {self.mask}), the rest kept "
                     f"exactly, with {jumps} RePaint jump{'s' * (jumps != 1)} back a stretch")
        return said
