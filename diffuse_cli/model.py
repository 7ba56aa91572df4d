"""A trained network with its config, and what sampling from it needs: the API's Model (api.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import device as device_module
from .checkpoint import save_model
from .config import Config, SampleConfig
from .editing import Plan
from .errors import UsageError
from .generate import calls_per_batch, edit_plan, fitting_batch, generate_batches
from .inputs import EditInputs, read_edit
from .samplers import check_sample_config, sampler_options
from .schedule import NoiseSchedule
from .training import Result
from .unet import UNet

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
        """n images as uint8 (n, C, H, W) (n of each class asked, of each init given); settings are
        SampleConfig's fields (sampler, steps, seed, classes, guidance, strength, ...) and sample_batches'
        keyword arguments. init: an image file, a folder of them or uint8 images to edit (SDEdit at
        `strength`); mask: where to generate (white or True), keeping the rest of the init (RePaint)."""
        callbacks = {k: settings.pop(k) for k in ("progress", "callback", "log", "cuda_graph") if k in settings}
        if isinstance(settings.get("classes"), (str, int)):
            settings["classes"] = (settings["classes"],)
        settings["classes"] = tuple(map(str, settings.get("classes", ())))
        edit = None if init is None and mask is None else self.edit_inputs(init, mask)
        return torch.cat(list(self.sample_batches(n, SampleConfig(**settings), edit=edit, **callbacks)))

    def edit_inputs(self, init: PathLike | torch.Tensor | None, mask: PathLike | torch.Tensor | None = None
                    ) -> EditInputs:
        """The init images (a file, a folder of them, or uint8 images) and mask of an edit, at this model's size."""
        if init is None:
            raise UsageError("--mask needs the image to fill in: give it with --init IMAGE")
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
                raise UsageError("--strength applies to an edit: give the image to start from with --init IMAGE")
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
            raise UsageError("this model was trained without classes; sample it without --class (train on a folder "
                             "of subfolders, one a class, for a model that has them)")
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
            raise UsageError(f"-n must be at least 1, not {n}")
        check_sample_config(settings, self.config.diffusion.timesteps)
        asked = self.request(n, settings, edit)
        total, labels, names = asked.total(n), asked.labels, self.config.model.class_names
        guidance = settings.guidance if labels is not None else 1.0
        if labels is None and names and edit is not None:  # an edit with no class asked: the init decides, not a
            labels = torch.full((total,), len(names))      # class drawn at random ("no class", unguided)
        batch_size = self.sampling_batch(min(settings.batch_size, total), log, copies=2 if guidance != 1 else 1)
        yield from generate_batches(self.net, self.config, total, sampler=settings.sampler, steps=settings.steps,
                                    seed=settings.seed, batch_size=batch_size, spacing=settings.spacing,
                                    precision=settings.precision, labels=labels, guidance=guidance,
                                    threshold=settings.threshold, class_weights=self.class_weights(),
                                    init=asked.init, strength=settings.strength, generate=asked.generate,
                                    resample_jumps=settings.resample_jumps, progress=progress, callback=callback,
                                    cuda_graph=cuda_graph, log=log, **sampler_options(settings))

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
        """The batch to sample with: batch_size, or on the CPU (where running out of memory is the
        system killing the process) the most that fits in the memory available, each network call
        holding `copies` of it (2 under guidance)."""
        if self.device.type != "cpu":
            return batch_size
        fits = fitting_batch(self.net, batch_size * copies, device_module.memory_available()) // copies
        fits = max(1, fits)
        if fits < batch_size:
            log(f"note: sampling {fits} image{'s' * (fits != 1)} at a time, which fits in the memory available "
                f"(--batch-size {batch_size} would not; the images are the same either way)")
        return fits

    def nfe(self, settings: SampleConfig = SampleConfig(), edit: EditInputs | None = None) -> int:
        """Network calls per batch for these settings; with guidance, each is one call on the batch twice over."""
        return calls_per_batch(settings.sampler, settings.steps, None if edit is None else self.edit_plan(settings, edit))

    def edit_plan(self, settings: SampleConfig, edit: EditInputs) -> Plan:
        """The path an edit takes: how far the init is noised, the steps visited and RePaint's stretches."""
        schedule = NoiseSchedule.make(self.config.diffusion.schedule, self.config.diffusion.timesteps)
        return edit_plan(schedule, settings.sampler, settings.steps, settings.spacing, settings.strength,
                         edit.generate is not None, settings.resample_jumps)

    def save(self, path: PathLike) -> Path:
        """Write the weights and config as a model checkpoint (safetensors); returns the path."""
        save_model(path, self.net, self.config, self.info)
        self.path = Path(path)
        return self.path


@dataclass(frozen=True)
class Request:
    """A sampling request laid out: each image's class index (None: no class asked) and file suffix, a grid
    row's length (None: a plain grid) and the image opening each row; for an edit, each image's init and mask."""

    labels: torch.Tensor | None
    suffixes: list[str] | None
    row: int | None
    heads: torch.Tensor | None = None
    init: torch.Tensor | None = None
    generate: torch.Tensor | None = None

    def total(self, n: int) -> int:
        return len(self.labels) if self.labels is not None else len(self.init) if self.init is not None else n
