"""A trained network with its config, and what sampling from it needs: the API's Model (api.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .network import device as device_module
from .formats.checkpoint import save_model
from .config import Config
from .diffusion.denoiser import edit_plan, fitting_batch, generate_batches
from .diffusion.editing import Plan
from .errors import UsageError
from .images.inputs import EditInputs, read_edit
from .diffusion.sampling import Request, SampleConfig
from .diffusion.schedule import NoiseSchedule
from .training.loop import Result
from .network.unet import UNet

PathLike = str | os.PathLike


@dataclass
class Model:
    """A trained network with its config: what sampling needs. `training` holds how a `train` call went."""

    net: UNet  # in eval mode, on its device
    config: Config
    info: dict[str, Any]
    path: Path | None = None  # the checkpoint it was loaded from or saved to
    training: Result | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def sample(self, n: int = 16, init: PathLike | torch.Tensor | None = None,
               mask: PathLike | torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
        """n images as uint8 (n, C, H, W) (n of each class asked, of each init given); settings are the
        sampling settings by name (SampleConfig.of: sampler, steps, eta, seed, classes, guidance, strength, ...)
        and sample_batches' keyword arguments. init: an image file, a folder of them or uint8 images to edit
        (SDEdit at `strength`); mask: where to generate (white or True), keeping the rest of the init (RePaint)."""
        callbacks = {k: settings.pop(k) for k in ("progress", "callback", "log", "cuda_graph") if k in settings}
        edit = None if init is None and mask is None else self.edit_inputs(init, mask)
        return torch.cat(list(self.sample_batches(n, SampleConfig.of(**settings), edit=edit, **callbacks)))

    def edit_inputs(self, init: PathLike | torch.Tensor | None, mask: PathLike | torch.Tensor | None = None
                    ) -> EditInputs:
        """The init images (a file, a folder of them, or uint8 images) and mask of an edit, at this model's size."""
        if init is None:
            raise UsageError("{mask} needs the image to fill in: give it with {init}", "mask", "init")
        m = self.config.model
        return read_edit(init, mask, m.image_size, m.channels)

    def request(self, n: int, settings: SampleConfig = SampleConfig(), edit: EditInputs | None = None) -> Request:
        """What a sampling request draws: each image's class, init and mask, in order (init by init, class by
        class, n of each), and how its files and grid are laid out."""
        labels = self.class_labels(n, settings)
        names = self.config.model.class_names
        per_init = n if labels is None else len(labels)
        classes = None if labels is None else [names[k] for k in labels.tolist()]
        if edit is None:
            if settings.strength != 1:
                raise UsageError("{strength} applies to an edit: give the image to start from with {init}",
                                 "strength", "init")
            return Request(labels, classes, None if labels is None else n)
        count, groups = len(edit.images), per_init // n  # an init's images: n of each class asked
        suffixes = [name if classes is None else f"{name}-{c}" for name in edit.names for c in classes or [None] * n]
        heads = edit.images if edit.generate is None else torch.where(edit.generate, 128, edit.images).to(torch.uint8)
        return Request(None if labels is None else labels.repeat(count), suffixes, n,
                       heads.repeat_interleave(groups, 0), edit.images.repeat_interleave(per_init, 0),
                       None if edit.generate is None else edit.generate.repeat_interleave(per_init, 0))

    def class_labels(self, n: int, settings: SampleConfig = SampleConfig()) -> torch.Tensor | None:
        """The class index of each image a request draws: n of each class asked, class by class (None: no class
        asked). A class is named, or given by its index; 'all' is every class."""
        names = self.config.model.class_names
        if not settings.classes:
            return None
        if not names:
            raise UsageError("this model was trained without classes; sample it without {classes} (train on a "
                             "folder of subfolders, one a class, for a model that has them)", "classes")
        if "all" in settings.classes:
            picked = list(range(len(names)))
        else:
            picked = []
            for asked in settings.classes:
                if asked in names:
                    picked.append(names.index(asked))
                elif asked.isdigit() and int(asked) < len(names):
                    picked.append(int(asked))
                else:
                    raise UsageError(f"unknown class {asked!r}; this model's classes are: {', '.join(names)}")
        return torch.tensor(picked).repeat_interleave(n)

    def sample_batches(self, n: int, settings: SampleConfig = SampleConfig(),
                       progress: Callable[[int, int], None] | None = None,
                       callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                       log: Callable[[str], None] = lambda message: None, cuda_graph: bool = True,
                       edit: EditInputs | None = None) -> Iterator[torch.Tensor]:
        """n images as uint8 batches (n of each class asked, of each init), each as soon as it is drawn; image i
        always from seed + i. On the CPU a batch that would not fit in memory is made smaller (`log` says so):
        the images are the same."""
        if n < 1:
            raise UsageError(f"{{n}} must be at least 1, not {n}", "n")
        settings.check(self.config.diffusion.timesteps)
        asked = self.request(n, settings, edit)
        total, labels, names = asked.total(n), asked.labels, self.config.model.class_names
        guidance = settings.guidance if labels is not None else 1.0
        if labels is None and names and edit is not None:  # an edit with no class asked: the init decides, not a
            labels = torch.full((total,), len(names))      # class drawn at random ("no class", unguided)
        batch_size = self.sampling_batch(min(settings.batch_size, total), log, copies=2 if guidance != 1 else 1)
        settings = replace(settings, batch_size=batch_size, guidance=guidance)
        yield from generate_batches(self.net, self.config, total, settings, replace(asked, labels=labels),
                                    self.class_weights(), progress, callback, cuda_graph, log)

    def class_weights(self) -> torch.Tensor | None:
        """How often the training data had each class, and then no class (images directly in the folder):
        what a sample with no class asked draws its classes from. None: equally."""
        counts = self.info.get("class_counts")
        names = self.config.model.class_names
        if not names or not isinstance(counts, dict) or set(counts) != set(names):
            return None
        unlabelled = max(0, int(self.info.get("data_size", 0)) - sum(counts.values()))
        return torch.tensor([counts[name] for name in names] + [unlabelled], dtype=torch.float64)

    def sampling_batch(self, batch_size: int, log: Callable[[str], None] = lambda message: None,
                       copies: int = 1) -> int:
        """The batch to sample with: batch_size, or the most that fits in the memory the device has free (on the
        CPU running out is the system killing the process; on a GPU, CUDA's error hours into a long job), each
        network call holding `copies` of it (2 under guidance)."""
        free = device_module.device_memory_available(self.device)
        fits = max(1, fitting_batch(self.net, batch_size * copies, free) // copies)
        if fits < batch_size:
            log(f"note: sampling {fits} image{'s' * (fits != 1)} at a time, which fits in the memory available "
                f"(a batch of {batch_size} would not; the images are the same either way)")
        return fits

    def nfe(self, settings: SampleConfig = SampleConfig(), edit: EditInputs | None = None) -> int:
        """Network calls per batch for these settings; with guidance, each is one call on the batch twice over."""
        return settings.sampler.nfe() if edit is None else self.edit_plan(settings, edit).nfe(settings.sampler.name)

    def edit_plan(self, settings: SampleConfig, edit: EditInputs) -> Plan:
        """The path an edit takes: how far the init is noised, the steps visited and RePaint's stretches."""
        schedule = NoiseSchedule.make(self.config.diffusion.schedule, self.config.diffusion.timesteps)
        return edit_plan(schedule, settings, edit.generate is not None)

    def save(self, path: PathLike) -> Path:
        """Write the weights and config as a model checkpoint (safetensors); returns the path."""
        save_model(path, self.net, self.config, self.info)
        self.path = Path(path)
        return self.path
