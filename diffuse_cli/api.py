"""The Python API: what the commands do, as functions and one class a notebook can call.

    import diffuse_cli as diffuse

    model = diffuse.train(images, steps=200, preset="tiny")   # a uint8 (N, C, H, W) tensor; nothing written
    model = diffuse.train("photos", out="runs/a", max_time="5m")  # a folder; checkpoints and grids in runs/a
    model = diffuse.load("runs/a")                             # a run folder, a folder of runs, or a file
    images = model.sample(16, sampler="ddim", steps=50)        # uint8 (16, C, H, W)
    diffuse.save_images(images, "samples/a")                   # 0000.png ... and grid.png
    panels = diffuse.noise("photo.png", [0, 250, 500])         # uint8 (3, C, H, W): x_t at each t

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
from .config import Config, DiffusionConfig, SampleConfig, Schedule, check_choice, make_config, parse_duration
from .data import ImageData, save_png
from . import device as device_module
from .device import pick_device, resolve_precision
from .errors import DataError, DiffuseError, TrainingFailed, UsageError, out_of_memory
from .files import MODEL_FILE, atomic_write_bytes
from .generate import Trajectory, fitting_batch, generate_batches
from .samplers import SAMPLERS, check_sample_config, sampler_options
from .schedule import NoiseSchedule
from .training import Hooks, Options, Result
from .unet import UNet

PathLike = str | os.PathLike
GRID_MAX = 64  # a grid.png shows at most this many images: an 8x8 grid


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

    def sample(self, n: int = 16, **settings: Any) -> torch.Tensor:
        """n images as uint8 (n, C, H, W) (n of each class asked); settings are SampleConfig's fields (sampler,
        steps, seed, classes, guidance, ...) and sample_batches' keyword arguments."""
        callbacks = {k: settings.pop(k) for k in ("progress", "callback", "log", "cuda_graph") if k in settings}
        if isinstance(settings.get("classes"), (str, int)):
            settings["classes"] = (settings["classes"],)
        settings["classes"] = tuple(map(str, settings.get("classes", ())))
        return torch.cat(list(self.sample_batches(n, SampleConfig(**settings), **callbacks)))

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
                       log: Callable[[str], None] = lambda message: None, cuda_graph: bool = True
                       ) -> Iterator[torch.Tensor]:
        """n images as uint8 batches, each as soon as it is drawn; image i always from seed + i. On the
        CPU a batch that would not fit in memory is made smaller (`log` says so): the images are the same."""
        if n < 1:
            raise UsageError(f"-n must be at least 1, not {n}")
        check_sample_config(settings, self.config.diffusion.timesteps)
        labels = self.class_labels(n, settings)
        total = n if labels is None else len(labels)
        guidance = settings.guidance if labels is not None else 1.0
        batch_size = self.sampling_batch(min(settings.batch_size, total), log, copies=2 if guidance != 1 else 1)
        yield from generate_batches(self.net, self.config, total, sampler=settings.sampler, steps=settings.steps,
                                    seed=settings.seed, batch_size=batch_size, spacing=settings.spacing,
                                    precision=settings.precision, labels=labels, guidance=guidance,
                                    threshold=settings.threshold, class_weights=self.class_weights(),
                                    progress=progress, callback=callback, cuda_graph=cuda_graph, log=log,
                                    **sampler_options(settings))

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

    def nfe(self, settings: SampleConfig = SampleConfig()) -> int:
        """Network calls per batch for these settings; with guidance, each is one call on the batch twice over."""
        return SAMPLERS[settings.sampler].nfe(settings.steps)

    def save(self, path: PathLike) -> Path:
        """Write the weights and config as a model checkpoint (safetensors); returns the path."""
        save_model(path, self.net, self.config, self.info)
        self.path = Path(path)
        return self.path


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


def noise(image: PathLike | torch.Tensor, t: list[int] | int, schedule: Schedule = DiffusionConfig.schedule,
          timesteps: int = DiffusionConfig.timesteps, seed: int = 0, image_size: int | None = None,
          max_side: int = 1024) -> torch.Tensor:
    """x_t of q(x_t | x_0) at each t (t = 0: the image, t = T: pure noise) with one ε: uint8 (len(t), C, H, W).

    image: a file (read at its own size, shrunk to max_side on its long side if longer, or resized
    and centre-cropped to image_size as training does) or a uint8 (C, H, W) tensor."""
    from .data import TooLarge, decode_image, read_image, to_model, to_uint8

    ts = [t] if isinstance(t, int) else list(t)
    check_choice(schedule, Schedule, "schedule")
    if timesteps < 2:
        raise UsageError(f"--timesteps must be at least 2, not {timesteps}")
    if bad := [k for k in ts if not 0 <= k <= timesteps]:
        raise UsageError(f"--t {bad[0]} is outside [0, {timesteps}] (0 is the clean image, {timesteps} pure noise)")
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be at least 1, not {image_size}")
    if max_side < 0:
        raise UsageError(f"--max-side must be 0 (never shrink) or more, not {max_side}")
    if isinstance(image, torch.Tensor):
        x0 = to_model(image)[None]
    else:
        image = Path(image)
        if image.is_dir():
            raise DataError(f"{image}: is a folder; give one image file")
        if not image.is_file():
            raise DataError(f"{image}: no such file")
        try:
            x0 = to_model(read_image(image, max_side=max_side) if image_size is None
                          else decode_image(image, image_size))[None]
        except TooLarge as e:
            hint = "; --max-side N reads a JPEG at a reduced scale" if image_size is None and not max_side else ""
            raise DataError(f"{image}: too large to show ({e}){hint}") from None
        except Exception as e:  # any decoder failure is the user's file, not our bug
            raise DataError(f"{image}: cannot read as an image ({e})") from None
    sched = NoiseSchedule.make(schedule, timesteps)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return torch.stack([to_uint8(x0[0] if k == 0 else sched.q_sample(x0, torch.tensor([k - 1]), eps)[0]) for k in ts])


def explore(model: Model, image: PathLike | torch.Tensor | None = None, frames: int = 60, seed: int = 0,
            class_name: str | None = None, guidance: float = SampleConfig.guidance):
    """The time slider's frames (slider.Frames) for an image (a file, resized and cropped as training does,
    or a uint8 (C, H, W) tensor at the model's size; None: one of the run's training images), walking back
    into `class_name` on a conditional model."""
    from .slider import explore_frames

    if frames < 2:
        raise UsageError(f"--frames must be at least 2, not {frames}")
    label = None
    if class_name is not None:
        labels = model.class_labels(1, SampleConfig(classes=(class_name,)))
        label = int(labels[0])
    x = _explore_image(model, image, seed) if not isinstance(image, torch.Tensor) else image
    m = model.config.model
    if tuple(x.shape) != (m.channels, m.image_size, m.image_size):
        raise DataError(f"the image is {tuple(x.shape)}; this model takes ({m.channels}, {m.image_size}, "
                        f"{m.image_size})")
    return explore_frames(model.net, model.config, x, frames, seed, label, guidance if label is not None else 1.0)


def _explore_image(model: Model, image: PathLike | None, seed: int) -> torch.Tensor:
    """The image to explore, decoded as training decodes it: a file, or else one of the run's training images."""
    from . import runs
    from .data import BUILTIN, decode_image, find_files, is_grayscale
    from .shapes import render_shapes

    m = model.config.model
    if image is None:
        data = model.info.get("data")
        if data == BUILTIN:
            return render_shapes(seed + 1, m.image_size, seed=0)[seed]
        folder = None
        if model.path is not None and (model.path.parent / "training_state.safetensors").exists():
            folder = runs.data_of_run(model.path.parent)
        files = find_files(Path(folder)) if folder else []
        if not files:
            raise UsageError("the run's training images are not here; name an image: diffuse explore photo.png")
        image = files[seed % len(files)]
    path = Path(image)
    if path.is_dir() or not path.is_file():
        raise DataError(f"{path}: {'is a folder; give one image file' if path.is_dir() else 'no such file'}")
    try:
        rgb = decode_image(path, m.image_size, 3)
    except Exception as e:  # any decoder failure is the user's file, not our bug
        raise DataError(f"{path}: cannot read as an image ({e})") from None
    if m.channels == 1 and not is_grayscale(rgb):
        raise DataError(f"{path} is in colour, and this model is grayscale (1 channel): give a grayscale image")
    return rgb[:1] if m.channels == 1 else rgb


def write_explorer(frames, path: PathLike, title: str = "diffuse: the time slider") -> Path:
    """Write the time slider's page (slider_page) to `path`, atomically; returns the path."""
    from .slider_page import page

    path = Path(path)
    atomic_write_bytes(path, page(frames, title).encode())
    return path


def save_images(images: torch.Tensor, folder: PathLike, start: int = 0, digits: int = 4,
                grid: bool = True) -> list[Path]:
    """Write uint8 (N, C, H, W) images as folder/NNNN.png (numbered from `start`), and grid.png of the
    first 64; returns the image paths."""
    folder, paths = Path(folder), []
    for i, image in enumerate(images):
        paths.append(folder / f"{start + i:0{digits}d}.png")
        save_png(image, paths[-1])
    if grid:
        save_grid([images], folder / "grid.png")
    return paths


class SampleFolder:
    """Samples written to a folder as they come (Ctrl-C keeps what was made): NNNN.png, or NNNN-CLASS.png for a
    class request, then grid.png: the first 64, or for a class request a row of each class."""

    def __init__(self, folder: PathLike, total: int, labels: torch.Tensor | None = None,
                 class_names: tuple[str, ...] = ()):
        self.folder, self.total, self.written, self.kept = Path(folder), total, 0, []
        self.names = None if labels is None else [class_names[k] for k in labels.tolist()]
        self.digits = max(4, len(str(total - 1)))  # 0000.png ...: names sort in order however many there are

    @staticmethod
    def check(folder: Path) -> Path:
        """Refuse, before any work, an --out that is a file or is named like one."""
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file; name a folder for the images with --out")
        if not folder.exists() and folder.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            raise UsageError(f"--out {folder} names the folder for the PNGs (and grid.png), not a file: "
                             f"e.g. --out {folder.with_suffix('')}")
        return folder

    def add(self, batch: torch.Tensor) -> None:
        for image in batch:
            suffix = "" if self.names is None else f"-{self.names[self.written]}"
            save_png(image, self.folder / f"{self.written:0{self.digits}d}{suffix}.png")
            self.written += 1
        self.kept.append(batch)

    def finish(self) -> str:
        """Write grid.png; returns what it shows, in words."""
        from .data import grid_upscale, make_grid

        images = torch.cat(self.kept)
        if self.names is None:
            save_grid(images, self.folder / "grid.png")
            return "grid.png" if len(images) <= GRID_MAX else f"grid.png (the first {GRID_MAX})"
        per_class = len(images) // len(dict.fromkeys(self.names)) if self.names else len(images)
        columns = min(per_class, 16)
        rows = images.view(-1, per_class, *images.shape[1:])[:GRID_MAX // 2, :columns]
        grid = make_grid(rows.flatten(0, 1), nrow=columns)
        save_png(grid, self.folder / "grid.png", grid_upscale(images.shape[-1]))
        return f"grid.png (a row of each class{f', the first {columns} of each' if columns < per_class else ''})"


def sample_folder_name(model: Model, settings: SampleConfig) -> Path:
    """samples/<run>-step<N>-<sampler>-<steps>steps-seed<seed>[-<classes>-w<guidance>]: more training, or other
    settings, make a new folder."""
    trained = f"-step{model.info['step']}" if isinstance(model.info.get("step"), int) else ""
    s = settings
    asked = f"-{'-'.join(s.classes)}-w{s.guidance:g}" if s.classes else ""
    return Path("samples") / f"{model.path.parent.name}{trained}-{s.sampler}-{s.steps}steps-seed{s.seed}{asked}"


def save_grid(images: torch.Tensor | list[torch.Tensor], path: PathLike) -> None:
    """Write the first GRID_MAX of uint8 (N, C, H, W) images (or a list of such batches) as one PNG grid,
    enlarged so that small images can be seen."""
    from .data import grid_upscale, make_grid

    images = torch.cat(images) if isinstance(images, list) else images
    save_png(make_grid(images[:GRID_MAX]), path, grid_upscale(images.shape[-1]))

__all__ = ["Model", "load", "train", "noise", "explore", "write_explorer", "save_images", "save_grid", "Trajectory", "Hooks", "SampleConfig",
           "ImageData", "DiffuseError", "GRID_MAX"]
