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
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import _API
from .api_convert import export_diffusers, import_diffusers  # noqa: F401 (the API)
from .api_ema import EmaChoice, posthoc_ema  # noqa: F401 (the API)
from .api_ema import check_eval_ema
from .api_eval import EvalSettings, Evaluation, evaluate  # noqa: F401 (the API)
from .api_images import (explore, explorer_path, interpolate, interpolation_folder_name, noise,  # noqa: F401
                         write_explorer, write_noise)
from .api_sample import SampleRun, sample_folder_name  # noqa: F401 (the API)
from .api_settings import parse_duration, require_positive
from .config import Config, DistillConfig, check_guidance, validate_train
from .diffusion.denoiser import SampleHooks  # noqa: F401 (the API)
from .diffusion.sampling import SampleConfig, SamplerChoice  # noqa: F401 (the API)
from .errors import DataError, DiffuseError, DiskFull, RunError, TrainingFailed, UsageError, out_of_memory
from .formats.checkpoint import load_model, resolve_checkpoint
from .formats.files import MODEL_FILE, STATE_FILE
from .images.data import ImageData
from .images.outputs import GRID_MAX, Trajectory, save_grid, save_images, save_strip  # noqa: F401 (the API)
from .images.pictures import grid_upscale, save_png  # noqa: F401 (the API)
from .model import Model, PathLike
from .network.device import pick_device, resolve_precision
from .network.threads import set_threads  # noqa: F401 (the API)
from .presets import make_config
from .training.budget import Budget
from .training.loop import Hooks, Options, Result
from .training.runs import resolve_run as run_folder  # noqa: F401 (the API: --out and --resume to a run folder)


def prepare_device(device: str = "auto", threads: int | None = None) -> torch.device:
    """The device a name picks (pick_device); on the CPU, malloc keeps freed memory for the next step, and the
    thread count is fixed at `threads` or (None) follows the cores other programs leave free (threads.py), whose
    reading starts now. All of it is process-wide, as the commands want it."""
    from .network.fast_ops import keep_cpu_memory
    from .network.threads import share

    picked = pick_device(device)
    if picked.type == "cpu":
        keep_cpu_memory()
        set_threads(threads)
        share().tick()
    return picked


def launch_plan(devices: int, device: str = "auto", out: PathLike | None = None) -> tuple[Path, dict[str, str]]:
    """What `diffuse train --devices N` starts under torchrun: the run folder (`out`, or a new one) and what its N
    processes' environment gains: on the CPU, each one's share of the cores to follow (network/threads.py), which
    torchrun would otherwise set to one thread. Refused: more GPUs than there are."""
    from .network.threads import SHARE_ENV, usable_cores
    from .training.runs import new_run_folder

    on_cuda = pick_device(device).type == "cuda"
    if on_cuda and devices > torch.cuda.device_count():
        raise UsageError(f"{{devices}} {devices}, but this machine has {torch.cuda.device_count()} GPU(s)", "devices")
    env = {}
    if not on_cuda and "OMP_NUM_THREADS" not in os.environ:
        share = str(max(1, usable_cores() // devices))
        env = {"OMP_NUM_THREADS": share, SHARE_ENV: share}
    return (Path(out) if out is not None else new_run_folder(None, "ddp")), env


def inspect(path: PathLike | None = None) -> tuple[dict[str, Any], Config]:
    """What a checkpoint holds, from its header alone (no weights are read): its facts, as `diffuse inspect
    --json` prints them, and its config. path: as load takes it."""
    from .formats.checkpoint import describe

    return describe(resolve_checkpoint(path))


def load(path: PathLike | None = None, device: str = "auto") -> Model:
    """A model checkpoint: a .safetensors file, a run folder, or the newest under a folder (default ./checkpoints)."""
    path = resolve_checkpoint(path)
    net, config, info = load_model(path, pick_device(device))
    return Model(net, config, info, path)


# Steps a distillation takes without steps or max_time: a fifth of a default training run's.
DISTILL_STEPS = 800
# A student starts as its teacher, so it is tuned rather than trained: a tenth of training's learning rate and a
# short warm-up, which distilled far better than training's in the same minutes (docs/distillation.md).
DISTILL_LR, DISTILL_WARMUP = 1e-4, 10


def distill(run: PathLike, out: PathLike | None = None, *, steps: int = 4, teacher_steps: int | None = None,
            guidance: float = 1.0, resume: bool = False, hooks: Hooks = Hooks(), **settings: Any) -> TrainedModel:
    """A student of the model in `run` (a run folder or a model file) that samples in `steps` DDIM network calls
    what the teacher draws in `teacher_steps` (default: 16 in each step, at least 64, at most the schedule's),
    guided by `guidance` where the model has classes (a distilled teacher: its own steps and guidance, and fewer
    steps); trained on the teacher's images (its run's folder, or the built-in shapes) into the run folder `out`
    (default: beside the teacher's, named for the steps; resume=True continues it). settings: TrainConfig's and
    TrainOptions' fields by name (max_time, batch_size, lr, device, ...), as train() takes them, but the
    training's steps as train_steps (steps are the student's); without train_steps or max_time, DISTILL_STEPS; lr and
    warmup default to DISTILL_LR and DISTILL_WARMUP.
    `diffuse sample` then draws with the student's own steps."""
    if "train_steps" in settings:
        settings["steps"] = settings.pop("train_steps")
    from .formats.checkpoint import read_metadata
    from .training import runs

    if resume:
        if out is None:
            raise UsageError("resume=True needs out, the distillation's run folder")
        return train(None, out, resume=True, hooks=hooks, **settings)  # on the images its run records
    teacher = resolve_checkpoint(run)
    config, _ = read_metadata(teacher)
    if (had := config.distill) is not None:  # a round of progressive distillation: the student is the teacher
        if steps >= had.steps:
            raise UsageError(f"{teacher} is distilled to {had.steps} steps; a student of it takes fewer, not "
                             f"{steps} (or distill its teacher, {had.teacher})", "steps")
        if had.steps % steps:  # each of the student's steps takes a whole number of its teacher's
            fits = ", ".join(str(k) for k in range(had.steps - 1, 0, -1) if had.steps % k == 0)
            raise UsageError(f"{teacher} is distilled to {had.steps} steps; a student of it takes a number of steps "
                             f"that divides them ({fits}), not {steps}", "steps")
        if teacher_steps not in (None, had.steps) or guidance not in (1.0, had.guidance):
            raise UsageError(f"{teacher} is distilled to {had.steps} steps with guidance {had.guidance:g}, which its "
                             "students learn from; leave out {teacher_steps} and {guidance}", "teacher_steps",
                             "guidance")
        teacher_steps, guidance = had.steps, had.guidance
    require_positive(steps=steps)
    timesteps = config.diffusion.timesteps
    if 2 * steps > timesteps:
        raise UsageError(f"a student of {steps} steps leaves its teacher no finer ones on the model's {timesteps} "
                         f"diffusion steps: {{steps}} takes at most {timesteps // 2}", "steps")
    if teacher_steps is None:  # 16 of the teacher's in each of the student's, at least 64 in all: a 4-step student
        teacher_steps = steps * max(16, -(-64 // steps))  # learns far better than from 16 (docs/distillation.md);
        teacher_steps = min(teacher_steps, timesteps // steps * steps)  # and no more than the schedule holds
    require_positive(teacher_steps=teacher_steps)
    if teacher_steps > timesteps:
        raise UsageError(f"{{teacher_steps}} {teacher_steps} is more than the model's {timesteps} diffusion steps",
                         "teacher_steps")
    check_guidance(guidance)
    from .diffusion.distillation import grids
    from .diffusion.schedule import NoiseSchedule

    grids(NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps), steps, teacher_steps)  # or refuse
    home = teacher.parent
    try:
        with runs.claim(home):  # held while a run trains: its weights are still changing
            pass
    except RunError:
        raise RunError(f"{home} is still training (another diffuse process holds it); distill it once it is done")
    out = Path(out) if out is not None else home.parent / f"{home.name}-distilled-{steps}steps"
    if (out / MODEL_FILE).exists():
        raise RunError(f"{out} already holds a model; pass {{resume}} to continue its distillation, or choose another "
                       "{out}", "resume", "out")
    data = runs.data_of_run(home) if (home / STATE_FILE).exists() else None
    if "steps" not in settings and settings.get("max_time") is None:
        settings["steps"] = DISTILL_STEPS
    settings = {"lr": DISTILL_LR, "warmup": DISTILL_WARMUP, **settings}
    student = replace(config, distill=DistillConfig(steps, teacher_steps, guidance, str(teacher.resolve())))
    return train(data, out, hooks=hooks, base=student, **settings)


@dataclass(frozen=True)
class TrainOptions:
    """How a train() call runs; none of it changes what the model learns (that is the settings': config.py).

    max_time: seconds or '10m' from `started` (time.monotonic(); None: the call), within which the images are
    read, the run set up, trained, and its last checkpoint and grid written; without the `steps` setting the
    learning rate decays over the steps that fit in it. checkpointing: recompute each residual block's activations
    in the backward (less memory, more compute); a batch that would not fit is split into micro-batches either way
    (training/memory.py). cache: keep a folder's decoded images in the cache folder (True: $DIFFUSE_CACHE, else
    ~/.cache/diffuse; a path; False: never), which later runs read without decoding (images/cache.py).
    eval_every: FID of eval_n samples every that many steps (metrics.jsonl, loss.png, and the best weights as
    model_best.safetensors; needs the [eval] extra); eval_ema: post-hoc EMA lengths each of those FIDs scores
    instead of the run's EMA, rebuilt at that step (the best length's weights kept). save_every, sample_every: None
    for the default intervals."""

    max_time: float | str | None = None
    started: float | None = None
    device: str = "auto"
    compile: bool = False
    cuda_graph: bool = True
    checkpointing: bool = False
    cache: PathLike | bool = True
    save_every: int | None = None
    sample_every: int | None = None
    eval_every: int | None = None
    eval_n: int = 1000
    eval_ema: tuple[float, ...] = ()


def train(data: PathLike | torch.Tensor | ImageData | None = None, out: PathLike | None = None, *,
          resume: bool = False, preset: str | None = None, hooks: Hooks = Hooks(), base: Config | None = None,
          start_from: PathLike | None = None, **settings: Any) -> TrainedModel:
    """Train a model and return it (its EMA weights).

    data: a folder of images, a uint8 (N, C, H, W) tensor, or None for the built-in shapes. out: the run
    folder for checkpoints, metrics and sample grids (None: nothing is written); resume=True continues
    the run there. settings: any field of ModelConfig, DiffusionConfig or TrainConfig by name (image_size,
    objective, batch_size, steps, lr, hflip, ...), and of TrainOptions, how the call runs (max_time, device,
    save_every, ...). base: the config to start from instead of a preset's (distill() gives its teacher's);
    then only TrainConfig's settings apply. start_from: a model (a run folder or a model file, one `import_diffusers`
    wrote too) whose weights the run starts from, with its network and forward process, on data of its size; a
    new optimizer, EMA and learning-rate schedule (EDM's transfer); a class embedding is added (zero: the model
    starts as it was) where the data has classes the model had not."""
    how = {f.name for f in fields(TrainOptions)}
    o = TrainOptions(**{k: settings.pop(k) for k in list(settings) if k in how})
    max_time, device, started = o.max_time, o.device, o.started
    from .images import data as data_module  # looked up at call time: tests stand in for load_data
    from .training import distributed, runs
    from .training.loop import train as train_loop

    started = time.monotonic() if started is None else started
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
        if start_from is not None:
            if preset is not None or base is not None:
                raise UsageError("{preset} and {start_from} both name the network; the run from a model keeps its own",
                                 "preset", "start_from")
            from .training.transfer import starting_weights

            base, initial, had = starting_weights(resolve_checkpoint(start_from))
        config = with_settings(base, settings) if base is not None else \
            make_config(preset, builtin=data is None, **{**_tensor_shape(data), **settings})
    if folder is not None and run is not None and Path(folder).is_dir() and \
            run.resolve().is_relative_to(Path(folder).resolve()):
        raise UsageError(f"the run folder {run} is inside the data folder {folder}: its sample grids would become "
                         "training images; choose another {out}", "out")
    fit_steps = seconds is not None and "steps" not in settings
    Budget.for_run(config.train, seconds, fit_steps, resume, run)  # refuse an unfitted resume before decoding
    resolve_precision(config.train.precision, torch_device)  # fp16 on the CPU is refused before any work
    require_positive(save_every=o.save_every, sample_every=o.sample_every)
    if o.eval_n < 2:
        raise UsageError(f"{{eval_n}} must be at least 2, not {o.eval_n}", "eval_n")
    if o.eval_every is not None:
        require_positive(eval_every=o.eval_every)
        from .evaluation.inception import network_file

        network_file()  # the [eval] extra missing is said before any work
    if o.eval_ema:
        check_eval_ema(o, config, run)

    if isinstance(data, ImageData):
        data_set = data
    else:
        auto_channels = folder is not None and not resume and base is None and "channels" not in settings
        hooks.stage("reading the images" if folder is not None else "drawing the built-in shapes")
        data_set = data_module.load_data(folder, config.model.image_size, None if auto_channels else config.model.channels,
                                         progress=hooks.decoding,
                                         copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # each DDP process holds one
                                         share=distributed.share(torch_device) if folder is not None else None,
                                         cache=o.cache)
    if data_set.image_size != config.model.image_size:
        raise DataError(f"the images are {data_set.image_size}x{data_set.image_size}, and the model is "
                        f"{config.model.image_size}x{config.model.image_size}")
    if data_set.channels != config.model.channels and start_from is not None and not resume:
        raise DataError(f"the images have {data_set.channels} channel(s) and the model {start_from} has "
                        f"{config.model.channels}")
    if data_set.channels != config.model.channels:  # 1 where every image is grayscale (the summary says so)
        config = replace(config, model=replace(config.model, channels=data_set.channels))
    config, data_set = with_classes(config, data_set, resume)
    if start_from is not None and not resume:
        from .training.transfer import with_class_embedding

        initial = with_class_embedding(initial, had, config, hooks.log)
        hooks.log(f"starting from {resolve_checkpoint(start_from)}: its weights, with a new optimizer, EMA and "
                  "learning-rate schedule")
    for note in data_set.notes(from_folder=folder is not None):
        hooks.log(note)
    sizing = None
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if preset is None and base is None and not resume and fit_steps and alone:  # --from: the model's own size
        from .config import split_fields
        from .training.sizing import size_for_budget, with_preset

        hooks.stage("timing a step to choose the network for the time")
        overrides = split_fields(settings)[0]
        sizing = size_for_budget(config, seconds - (time.monotonic() - started), torch_device,
                                 resolve_precision(config.train.precision, torch_device), overrides)
        config = with_preset(config, sizing.preset, overrides)

    # Not choices made for the user: the shape of images in memory, and the built-in shapes' colour.
    given_by_data = {"channels"} | ({"image_size"} if isinstance(data, ImageData) else set()) if folder is None else set()
    options = Options(device=torch_device, save_every=o.save_every, sample_every=o.sample_every,
                      eval_every=o.eval_every, eval_n=o.eval_n, eval_ema=tuple(o.eval_ema), max_time=seconds,
                      started=started, fit_steps=fit_steps, resume=resume, compile=o.compile, cuda_graph=o.cuda_graph,
                      checkpointing=o.checkpointing, sizing=sizing,
                      initial_weights=initial if start_from is not None and not resume else None,
                      chosen=frozenset(settings) | given_by_data,
                      **({} if config.distill is None else
                         {"grid_sampler": "ddim", "grid_steps": config.distill.steps}))
    fresh = run is not None and not run.exists()
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        with runs.claim(run) if run is not None and is_main else nullcontext():
            result = train_loop(config, data_set, run, options, hooks)
    except BaseException as e:
        if fresh and run.is_dir() and not any(run.iterdir()):
            run.rmdir()  # a run that failed before writing anything leaves no empty run folder behind
        if isinstance(e, DiskFull):  # every checkpoint is written to a temporary file and renamed: the last is whole
            raise DiskFull(f"{e}; training stopped: free some space, then resume the run") from None
        if isinstance(e, OSError):  # a failing disk, say
            raise OSError(e.errno, f"{e.strerror or e}; the last checkpoint saved, if any, is intact", e.filename) from None
        if isinstance(e, RuntimeError) and out_of_memory(e):
            raise TrainingFailed(str(e).splitlines()[0].rstrip(".") + "; try a smaller {batch_size} (with {grad_accum} "
                                 "to keep the effective batch) or a smaller {image_size} or {preset}", "batch_size",
                                 "grad_accum", "image_size", "preset") from None
        raise
    info = {"step": result.step, "data": data_set.source, "data_size": len(data_set)}
    return TrainedModel(result.ema.eval(), result.config, info, None if run is None else run / MODEL_FILE, result)


def with_settings(base: Config, settings: dict[str, Any]) -> Config:
    """base with the optimisation's settings; the network's and the forward process's are refused."""
    from .config import split_fields

    model_settings, diffusion_settings, train_settings = split_fields(settings)
    if model_settings or diffusion_settings:
        raise UsageError(f"{{{sorted({**model_settings, **diffusion_settings})[0]}}} is the model's: this run keeps "
                         "the network and forward process it starts from", *model_settings, *diffusion_settings)
    return replace(base, train=validate_train(replace(base.train, **train_settings)))


@dataclass
class TrainedModel(Model):
    """A Model fresh from train(): `training` holds how the run went (its steps, why it stopped, its records)."""

    training: Result | None = None


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


__all__ = list(_API)  # the one list of the API's names, diffuse_cli/__init__.py's
