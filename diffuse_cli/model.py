"""A trained network with its config, and what sampling from it needs: the API's Model (api.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import Config
from .diffusion.denoiser import Request, SampleHooks, draw, fitting_batch, request
from .diffusion.sampling import SampleConfig
from .diffusion.schedule import NoiseSchedule
from .errors import UsageError
from .formats.checkpoint import save_model
from .images.inputs import EditInputs, read_edit
from .network import device as device_module
from .network.unet import UNet

PathLike = str | os.PathLike


@dataclass
class Model:
    """A trained network with its config: what sampling needs."""

    net: UNet  # in eval mode, on its device
    config: Config
    info: dict[str, Any]
    path: Path | None = None  # the checkpoint it was loaded from or saved to

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.make(self.config.diffusion.schedule, self.config.diffusion.timesteps)

    def sample(self, n: int = 16, init: PathLike | torch.Tensor | None = None,
               mask: PathLike | torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
        """n images as uint8 (n, C, H, W) (n of each class asked, of each init given); settings are the sampling
        settings by name (SampleConfig.of: sampler, steps, eta, seed, classes, guidance, strength, ...) and
        SampleHooks' fields (progress, callback, log, cuda_graph). init: an image file, a folder of them or uint8
        images to edit (SDEdit at `strength`); mask: where to generate (white or True), keeping the rest of the
        init (RePaint)."""
        hooks = SampleHooks(**{k: settings.pop(k) for k in ("progress", "callback", "log", "cuda_graph")
                               if k in settings})
        edit = None if init is None and mask is None else self.edit_inputs(init, mask)
        return torch.cat(list(self.sample_batches(n, SampleConfig.of(**settings), hooks, edit)))

    def edit_inputs(self, init: PathLike | torch.Tensor | None, mask: PathLike | torch.Tensor | None = None
                    ) -> EditInputs:
        """The init images (a file, a folder of them, or uint8 images) and mask of an edit, at this model's size."""
        if init is None:
            raise UsageError("{mask} needs the image to fill in: give it with {init}", "mask", "init")
        m = self.config.model
        return read_edit(init, mask, m.image_size, m.channels)

    def request(self, n: int, settings: SampleConfig = SampleConfig(), edit: EditInputs | None = None) -> Request:
        """What drawing n images with these settings asks of this model, checked (denoiser.request): each image's
        class (drawn as often as the training data had it, where none is asked), init and mask."""
        return request(self.config, n, settings, None, None if edit is None else edit.images,
                       None if edit is None else edit.generate, self.class_weights())

    def sample_batches(self, n: int, settings: SampleConfig = SampleConfig(), hooks: SampleHooks = SampleHooks(),
                       edit: EditInputs | None = None) -> Iterator[torch.Tensor]:
        """n images as uint8 batches (n of each class asked, of each init), each as soon as it is drawn; image i
        always from seed + i. A batch that would not fit in memory is made smaller (hooks.log says so): the images
        are the same."""
        yield from self.draw(self.request(n, settings, edit), hooks)

    def draw(self, asked: Request, hooks: SampleHooks = SampleHooks()) -> Iterator[torch.Tensor]:
        """A request's images as uint8 batches (denoiser.draw), the batch made smaller where it would not fit in
        memory (hooks.log says so; the images are the same)."""
        s = asked.settings
        batch_size = self.sampling_batch(min(s.batch_size, asked.total), hooks.log, copies=2 if s.guidance != 1 else 1)
        yield from draw(self.net, self.config, replace(asked, settings=replace(s, batch_size=batch_size)), hooks)

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

    def save(self, path: PathLike) -> Path:
        """Write the weights and config as a model checkpoint (safetensors); returns the path."""
        save_model(path, self.net, self.config, self.info)
        self.path = Path(path)
        return self.path
