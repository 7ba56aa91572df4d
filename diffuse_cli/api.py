"""The Python API: what the commands do, as functions and one class a notebook can call.

    import diffuse_cli as diffuse

    model = diffuse.train(images, steps=200, preset="tiny")   # a uint8 (N, C, H, W) tensor; nothing written
    model = diffuse.train("photos", out="runs/a", max_time="5m")  # a folder; checkpoints and grids in runs/a
    model = diffuse.load("runs/a")                             # a run folder, a folder of runs, or a file
    images = model.sample(16, sampler="ddim", steps=50)        # uint8 (16, C, H, W)
    diffuse.save_images(images, "samples/a")                   # 0000.png ... and grid.png
    panels = diffuse.noise("photo.png", [0, 250, 500])         # uint8 (3, C, H, W): x_t at each t
    edits = model.sample(8, init="sketch.png", strength=0.6)   # SDEdit; mask="hole.png" inpaints

Nothing here prints or exits: progress and messages come through callbacks, and input that
cannot work raises a DiffuseError whose message says what to do. Files are written only where
a function is given a path.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .budget import Budget
from .checkpoint import load_model, resolve_checkpoint, save_model
from .config import Config, SampleConfig, make_config, parse_duration
from .data import ImageData
from . import device as device_module
from .device import pick_device, resolve_precision
from .errors import DataError, DiffuseError, TrainingFailed, UsageError, out_of_memory
from .files import MODEL_FILE
from .generate import Trajectory, calls_per_batch, edit_plan, fitting_batch, generate_batches
from .editing import Plan
from .inputs import EditInputs, read_edit
from .outputs import GRID_MAX, save_grid, save_images, save_strip  # noqa: F401 (the API)
from .samplers import check_sample_config, sampler_options
from .schedule import NoiseSchedule
from .threads import set_threads  # noqa: F401 (the API)
from .training import Hooks, Options, Result
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


def load(path: PathLike | None = None, device: str = "auto") -> Model:
    """A model checkpoint: a .safetensors file, a run folder, or the newest under a folder (default ./checkpoints)."""
    path = resolve_checkpoint(path)
    net, config, info = load_model(path, pick_device(device))
    return Model(net, config, info, path)


def train(data: PathLike | torch.Tensor | ImageData | None = None, out: PathLike | None = None, *,
          resume: bool = False, preset: str | None = None, max_time: float | str | None = None,
          device: str = "auto", compile: bool = False, cuda_graph: bool = True, save_every: int | None = None,
          sample_every: int | None = None, hooks: Hooks = Hooks(), **settings: Any) -> Model:
    """Train a model and return it (its EMA weights).

    data: a folder of images, a uint8 (N, C, H, W) tensor, or None for the built-in shapes. out: the run
    folder for checkpoints, metrics and sample grids (None: nothing is written); resume=True continues
    the run there. settings: any field of ModelConfig, DiffusionConfig or TrainConfig by name (image_size,
    objective, batch_size, steps, lr, hflip, ...). max_time: seconds or '10m'; without `steps` the
    learning rate decays over the steps that fit in it."""
    from . import data as data_module  # looked up at call time: tests stand in for load_data
    from . import distributed, runs
    from .training import train as train_loop

    seconds = parse_duration(max_time) if isinstance(max_time, str) else max_time
    data = ImageData.from_tensor(data) if isinstance(data, torch.Tensor) else data  # checked before anything else
    torch_device, run = pick_device(device), None if out is None else Path(out)
    folder = None if data is None or isinstance(data, ImageData) else str(data)
    if folder is not None and not Path(folder).exists():
        raise DataError(f"{folder}: no such file or folder")
    if resume:
        if run is None:
            raise UsageError("resume=True needs out, the run folder to continue")
        if data is None and (folder := runs.data_of_run(run)) is not None:
            hooks.log(f"resuming, on its data: {folder}")
        config = runs.config_for_run(run, preset, settings)
    else:
        config = make_config(preset, builtin=data is None, **{**_tensor_shape(data), **settings})
    if folder is not None and run is not None and Path(folder).is_dir() and \
            run.resolve().is_relative_to(Path(folder).resolve()):
        raise UsageError(f"the run folder {run} is inside the data folder {folder}: its sample grids would become "
                         "training images; choose another --out")
    fit_steps = seconds is not None and "steps" not in settings
    Budget.for_run(config.train, seconds, fit_steps, resume, run)  # refuse an unfitted resume before decoding
    resolve_precision(config.train.precision, torch_device)  # fp16 on the CPU is refused before any work

    if isinstance(data, ImageData):
        data_set = data
    else:
        auto_channels = folder is not None and not resume and "channels" not in settings
        data_set = data_module.load_data(folder, config.model.image_size, None if auto_channels else config.model.channels,
                                         progress=hooks.decoding,
                                         copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # each DDP process holds one
                                         share=distributed.share(torch_device) if folder is not None else None)
    if data_set.image_size != config.model.image_size:
        raise DataError(f"the images are {data_set.image_size}x{data_set.image_size}, and the model is "
                        f"{config.model.image_size}x{config.model.image_size}")
    if data_set.channels != config.model.channels:  # 1 where every image is grayscale (the summary says so)
        config = replace(config, model=replace(config.model, channels=data_set.channels))
    config, data_set = with_classes(config, data_set, resume)
    for note in data_set.notes(from_folder=folder is not None):
        hooks.log(note)

    # Not choices made for the user: the shape of images in memory, and the built-in shapes' colour.
    given_by_data = {"channels"} | ({"image_size"} if isinstance(data, ImageData) else set()) if folder is None else set()
    options = Options(device=torch_device, save_every=save_every, sample_every=sample_every, max_time=seconds,
                      fit_steps=fit_steps, resume=resume, compile=compile, cuda_graph=cuda_graph,
                      chosen=frozenset(settings) | given_by_data)
    fresh = run is not None and not run.exists()
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        with runs.claim(run) if run is not None and is_main else nullcontext():
            result = train_loop(config, data_set, run, options, hooks)
    except BaseException as e:
        if fresh and run.is_dir() and not any(run.iterdir()):
            run.rmdir()  # a run that failed before writing anything leaves no empty run folder behind
        if isinstance(e, OSError):  # a full disk, say: every checkpoint is written to a temporary file and renamed
            raise OSError(e.errno, f"{e.strerror or e}; the last checkpoint saved, if any, is intact", e.filename) from None
        if isinstance(e, RuntimeError) and out_of_memory(e):
            raise TrainingFailed(str(e).splitlines()[0].rstrip(".") + "; try a smaller --batch-size (with --grad-accum "
                                 "to keep the effective batch) or a smaller --image-size or --model") from None
        raise
    info = {"step": result.step, "data": data_set.source, "data_size": len(data_set)}
    return Model(result.ema.eval(), result.config, info, None if run is None else run / MODEL_FILE, result)


def with_classes(config: Config, data: ImageData, resume: bool) -> tuple[Config, ImageData]:
    """The class names a run learns: the data's (unless --classes off), or on resume the run's own, which
    the data must still have."""
    if resume:
        names = config.model.class_names
        if names and tuple(data.classes) != names:
            raise DataError(f"the run learned the classes {', '.join(names)}; the data now has "
                            f"{', '.join(data.classes) or 'none'}: name the folder it trained on")
        return config, data if names else data.without_classes()
    if config.train.classes == "off" or not data.classes:
        return config, data.without_classes()
    return replace(config, model=replace(config.model, class_names=tuple(data.classes))), data


def _tensor_shape(data: object) -> dict[str, int]:
    """The image size and channels of in-memory data, for a new config."""
    if isinstance(data, ImageData):
        return {"image_size": data.image_size, "channels": data.channels}
    return {}


# The functions on images and folders, beside the model: the forward process, the time slider, interpolation,
# diffusers' folders. Imported last: they use Model, defined above.
from .api_tools import (explore, export_diffusers, import_diffusers, interpolate, noise,  # noqa: E402,F401
                        sample_folder_name, write_explorer)


__all__ = ["Model", "load", "train", "noise", "explore", "interpolate", "import_diffusers", "export_diffusers",
           "write_explorer", "sample_folder_name", "save_images", "save_grid", "save_strip", "Trajectory", "Hooks",
           "SampleConfig", "ImageData", "DiffuseError", "GRID_MAX", "set_threads"]
