"""A sampling run written to a folder, as `diffuse sample` does it: the folder checked before any work, each
batch saved as it is drawn, grid.png (and a trajectory) at the end, and what was done in words."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..model import Model, PathLike
from .outputs import SampleFolder, Trajectory, check_folder
from ..diffusion.sampling import SampleConfig


class SampleRun:
    """n images (of each class asked, of each init) from `model` into `folder` (None: the name sample_folder_name
    gives), editing `init` (inside `mask`) when given; `written` counts the images saved so far."""

    def __init__(self, model: Model, n: int | None = None, settings: SampleConfig = SampleConfig(),
                 folder: PathLike | None = None, init: PathLike | None = None, mask: PathLike | None = None,
                 trajectory: bool = False):
        from ..api_tools import sample_folder_name

        settings.check(model.config.diffusion.timesteps)
        self.model, self.settings, self.init, self.mask = model, settings, init, mask
        self.edit = None if init is None and mask is None else model.edit_inputs(init, mask)
        self.n = n or (1 if self.edit is not None and Path(init).is_dir() else 16)
        self.request = model.request(self.n, settings, self.edit)
        self.folder = check_folder(Path(folder) if folder else sample_folder_name(model, settings, init, mask))
        self.trajectory = Trajectory() if trajectory else None
        self.files = SampleFolder(self.folder, self.request.total(self.n), self.request.suffixes, self.request.row,
                                  self.request.heads, self.trajectory)
        self.notes = list(self.edit.notes) if self.edit else []  # what reading the edit's inputs changed
        self.elapsed, self.grid = 0.0, ""

    @property
    def written(self) -> int:
        return self.files.written

    def run(self, progress: Callable[[float, int], None] | None = None, log: Callable[[str], None] = lambda m: None,
            cuda_graph: bool = True) -> Path:
        """Draw and save every batch as it comes (an interruption keeps what was made), then the grid; returns the
        folder."""
        start = time.perf_counter()
        for batch in self.model.sample_batches(self.n, self.settings, progress=progress, callback=self.trajectory,
                                               log=log, cuda_graph=cuda_graph, edit=self.edit):
            self.files.add(batch)
        self.grid = self.files.finish()
        self.elapsed = time.perf_counter() - start
        return self.folder

    def summary(self) -> list[str]:
        """What was drawn, how, how fast, and where it went, in lines."""
        s, model, total = self.settings, self.model, self.written
        labels = self.request.labels
        doubled = ", each on the batch twice over (guidance)" if labels is not None and s.guidance != 1 else ""
        lines = [f"{s.sampler.name}, {s.sampler.steps} steps, {model.nfe(s, self.edit)} network calls per batch"
                 f"{doubled}, {self.elapsed / max(total, 1) * 1000:.0f} ms per image ({self.elapsed:.1f} s in all) "
                 f"from {model.path}"]
        if self.edit is not None:
            lines.append(self.edit_line())
        names = dict.fromkeys(model.config.model.class_names[k] for k in ([] if labels is None else labels.tolist()))
        classes = f" ({self.n} of each of {', '.join(names)}, guidance {s.guidance:g})" if names else ""
        lines.append(f"wrote {total} image{'s' * (total != 1)}{classes} and {self.grid} to {self.folder}/"
                     + (" (+ trajectory.png, trajectory.gif)" if self.trajectory else ""))
        return lines

    def edit_line(self) -> str:
        """What an edit did, in a line."""
        s, edit, T = self.settings, self.edit, self.model.config.diffusion.timesteps
        plan = self.model.edit_plan(s, edit)
        count = f"{len(edit.images)} images of {self.init}/" if len(edit.images) > 1 else str(self.init)
        said = f"edited {count}: " + (f"SDEdit at strength {s.strength:g}, noised to t = {plan.k} of {T} and denoised "
                                      f"in {len(plan.timesteps)} of the {s.sampler.steps} steps" if plan.k < T
                                      else "from pure noise")
        if self.mask is not None:
            said += (f"; inpainted {edit.generated_share():.0%} of the pixels (the white of {self.mask}), the rest kept "
                     f"exactly, with {s.resample_jumps} RePaint jump{'s' * (s.resample_jumps != 1)} back a stretch")
        return said
