"""The `diffuse` command: parse options, call one engine function, print the result.

torch is imported inside the commands, so that `diffuse --help` answers at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.table import Table

from . import __version__
from .config import (BUILTIN_IMAGE_SIZE, PRESETS, UNFITTED_STEPS, Config, LRSchedule, ConfigError, DiffusionConfig, ModelConfig, Objective, Precision, Schedule, TrainConfig,
                     check_choice, model_config, parse_duration, to_dict, validate_diffusion, validate_train)
from .console import Interrupted, TrainingProgress, err, install_stop_handler, interrupted_says, out, progress_bar
from .runs import claim, config_for_run, data_of_run, new_run_folder, resolve_run

if TYPE_CHECKING:
    from .data import ImageData

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Train a denoising diffusion model (DDPM) on a folder of images, and sample from it.")
# Below this many training images a diffusion model soon reproduces them: a note says so at start.
FEW_IMAGES = 1000
GRID_MAX = 64  # `sample` puts at most this many images in grid.png: an 8x8 grid


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def require_positive(**options: int | None) -> None:
    """Refuse the first option below 1 (None: not given), by its flag: require_positive(save_every=0) ->
    '--save-every must be ...'."""
    for name, value in options.items():
        if value is not None and value < 1:
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, not {value}")


def compute_device(name: str):
    """The device to train or sample on; on the CPU, malloc keeps freed memory for the next step."""
    from .device import keep_cpu_memory, pick_device

    device = pick_device(name)
    if device.type == "cpu":
        keep_cpu_memory()
    return device


# -- train --------------------------------------------------------------------------------
def data_notes(data_set: ImageData, image_size: int, from_folder: bool) -> list[str]:
    """The warnings and notes that a loaded data set calls for, as lines of rich markup."""
    from rich.markup import escape

    n, skipped, upscaled, notes = len(data_set), data_set.skipped, data_set.upscaled, []
    if skipped:
        listed = escape(", ".join(f"{Path(p).name} ({why})" for p, why in skipped[:8]))
        more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        notes.append(f"[yellow]warning:[/] skipped {len(skipped)} of {n + len(skipped)} files: {listed}{more}")
    if upscaled:
        one = len(upscaled) == 1
        smallest, (verb, pronoun, possessive) = min(upscaled), ("is", "it", "its") if one else ("are", "them", "their")
        notes.append(f"[yellow]warning:[/] {len(upscaled)} of {n} images {verb} smaller than --image-size {image_size} "
                     f"(the smallest is {smallest} pixel{'s' * (smallest != 1)} on its short side) and {verb} "
                     f"enlarged, which blurs {pronoun}; a smaller --image-size keeps {possessive} detail")
    if from_folder and n < FEW_IMAGES:
        notes.append(f"[yellow]note:[/] {n} image{'s' * (n != 1)} is few for a diffusion model (thousands are "
                     "usual); as training goes on its samples will copy them more and more closely")
    if data_set.images is None:
        notes.append("[yellow]note:[/] the decoded images do not fit in memory; decoding on demand (slower)")
    return notes


def _launch_devices(devices: int, device: str) -> None:
    """Re-run this command under torchrun with `devices` processes on this machine."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--devices")
            and not (i > 0 and sys.argv[i] == "--devices")]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(new_run_folder(None, "ddp"))]
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda and devices > torch.cuda.device_count():
        raise UserError(f"--devices {devices}, but this machine has {torch.cuda.device_count()} GPU(s)")
    if not on_cuda and "OMP_NUM_THREADS" not in os.environ:  # else torchrun gives each process one thread
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // devices))
    out_at = args.index("--out") + 1 if "--out" in args else None
    # torchrun's --signals-to-handle (newer torch): it passes these on to the processes, which save and stop;
    # SIGUSR1 is what Slurm's --signal sends ahead of a job's time limit
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    try:
        torchrun(["--standalone", f"--nproc-per-node={devices}", "-m", "diffuse_cli", *args])
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        raise Interrupted(f"stopped by {name}: each process was asked to save and stop") from None
    except ChildFailedError as e:
        rank, failure = next(iter(e.failures.items()), (0, None))
        code = getattr(failure, "exitcode", 1)
        where = f" --out {args[out_at]}" if out_at else ""
        raise UserError(f"training process {rank} of {devices} failed (exit code {code}); the others were stopped. "
                        f"Resume with: diffuse train --resume auto{where} --devices {devices}") from None


@app.command(epilog="Examples:\n\n  diffuse train                          # built-in shapes, default settings\n\n"
             "  diffuse train ./photos --image-size 64 --max-time 2h\n\n"
             "  diffuse train --resume auto --out checkpoints/mine   # continue a stopped run\n\n"
             "  diffuse train ./photos --devices 4     # four processes (DDP) on this machine")
def train(
    data: Optional[str] = typer.Argument(None, help="Folder of images (searched recursively). Default: built-in shapes; on --resume, the run's own."),
    image_size: Optional[int] = typer.Option(None, help=f"Train at this resolution (short side resized, centre crop). \\[default: {ModelConfig.image_size}; {BUILTIN_IMAGE_SIZE} for the built-in shapes]"),
    channels: Optional[int] = typer.Option(None, help="3 for RGB, 1 for grayscale. \\[default: 1 if every image is grayscale, else 3]"),
    model: Optional[str] = typer.Option(None, "--model", "--preset", help=f"U-Net size: {', '.join(PRESETS)}. \\[default: {Config.preset}]"),
    schedule: Optional[str] = typer.Option(None, help=f"Noise schedule: linear, cosine or sigmoid. \\[default: {DiffusionConfig.schedule}]"),
    objective: Optional[str] = typer.Option(None, help=f"What the network predicts: eps, x0 or v. \\[default: {DiffusionConfig.objective}]"),
    timesteps: Optional[int] = typer.Option(None, help=f"Diffusion steps T. \\[default: {DiffusionConfig.timesteps}]"),
    dropout: Optional[float] = typer.Option(None, help="Dropout in residual blocks. \\[default: the preset's]"),
    batch_size: Optional[int] = typer.Option(None, help=f"Global batch (split across processes under DDP). \\[default: {TrainConfig.batch_size}]"),
    steps: Optional[int] = typer.Option(None, help=f"Optimizer steps to train for. \\[default: {TrainConfig.steps}; "
                                        "with --max-time, what the budget holds]"),
    max_time: Optional[str] = typer.Option(None, help="Stop after this wall-clock time (90s, 10m, 2h, 1h30m), save and sample; "
                                           "without --steps, the LR decays over the steps that fit in it."),
    lr: Optional[float] = typer.Option(None, help=f"Peak learning rate (AdamW). Not rescaled with batch or processes. \\[default: {TrainConfig.lr}]"),
    lr_schedule: Optional[str] = typer.Option(None, help=f"constant or cosine (decay to 10%) after warm-up. \\[default: {TrainConfig.lr_schedule}]"),
    warmup: Optional[int] = typer.Option(None, help=f"Linear LR warm-up steps. \\[default: {TrainConfig.warmup}]"),
    grad_accum: Optional[int] = typer.Option(None, help=f"Micro-batches per optimizer step. \\[default: {TrainConfig.grad_accum}]"),
    grad_clip: Optional[float] = typer.Option(None, help=f"Clip the gradient norm (0: off). \\[default: {TrainConfig.grad_clip}]"),
    min_snr_gamma: Optional[float] = typer.Option(None, help=f"Min-SNR-γ loss weighting (0: off). \\[default: {TrainConfig.min_snr_gamma}]"),
    ema_max_decay: Optional[float] = typer.Option(None, help=f"Upper bound of the EMA decay. \\[default: {TrainConfig.ema_max_decay}]"),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Mirror training images left-right at random; "
                                         "--no-hflip for text, digits or anything with a handedness. \\[default: hflip]"),
    precision: Optional[str] = typer.Option(None, help=f"auto, fp32, bf16 or fp16. \\[default: {TrainConfig.precision}]"),
    seed: Optional[int] = typer.Option(None, help=f"Seed for weights, data order and noise. \\[default: {TrainConfig.seed}]"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder. \\[default: checkpoints/<data>-<preset>-<time>]"),
    resume: Optional[str] = typer.Option(None, help="Run folder to continue, or 'auto' (--out, else the newest run)."),
    save_every: Optional[int] = typer.Option(None, help="Save the checkpoint every N steps (and at the end). "
                                             "\\[default: every 500 steps, at most once a minute]"),
    sample_every: Optional[int] = typer.Option(None, help="Write samples/step_N.png every N steps (and at the end). "
                                               "\\[default: every 500 steps, at most once a minute]"),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network (the plain module is saved)."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph",
                                    help="On one GPU in bf16/fp32, replay each step as one CUDA graph (2-7x faster "
                                         "steps for the presets at 32x32); off to debug."),
    devices: int = typer.Option(1, help="Processes on this machine (DDP through torchrun); one GPU each on CUDA."),
) -> None:
    """Train a diffusion model; writes checkpoints/<run>/ (weights, sample grids, metrics)."""
    if devices > 1:
        return _launch_devices(devices, device)
    require_positive(devices=devices, save_every=save_every, sample_every=sample_every)
    given_model = {k: v for k, v in dict(image_size=image_size, channels=channels, dropout=dropout).items() if v is not None}
    given_diffusion = {k: v for k, v in dict(schedule=schedule, objective=objective, timesteps=timesteps).items()
                       if v is not None}
    given_train = {k: v for k, v in dict(batch_size=batch_size, steps=steps, lr=lr, lr_schedule=lr_schedule,
                                         warmup=warmup, grad_accum=grad_accum, grad_clip=grad_clip,
                                         min_snr_gamma=min_snr_gamma, ema_max_decay=ema_max_decay, hflip=hflip,
                                         precision=precision, seed=seed).items() if v is not None}
    if "schedule" in given_diffusion:
        check_choice(schedule, Schedule, "schedule")
    if "objective" in given_diffusion:
        check_choice(objective, Objective, "objective")
    if "precision" in given_train:
        check_choice(precision, Precision, "precision")
    if "lr_schedule" in given_train:
        check_choice(lr_schedule, LRSchedule, "lr-schedule")
    preset = model or Config.preset
    size = BUILTIN_IMAGE_SIZE if data is None else ModelConfig.image_size
    new = Config(preset=preset, model=model_config(preset, **{"image_size": size, **given_model}),
                 diffusion=validate_diffusion(DiffusionConfig(**given_diffusion)), train=validate_train(TrainConfig(**given_train)))
    budget = parse_duration(max_time) if max_time else None
    if data is not None and not Path(data).exists():
        raise UserError(f"{data}: no such file or folder")

    from . import distributed
    from .data import load_data
    from .device import resolve_precision
    from .train import Hooks, Options
    from .train import train as run_training

    torch_device = compute_device(device)
    confirm = (lambda q: typer.confirm(q, default=True, err=True)) if sys.stdin.isatty() else None
    run, resuming = resolve_run(out_dir, resume, data, preset, confirm)
    data_from_run = resuming and data is None
    if data_from_run:
        data = data_of_run(run)
    if data is not None and Path(data).is_dir() and run.resolve().is_relative_to(Path(data).resolve()):
        raise UserError(f"the run folder {run} is inside the data folder {data}: its sample grids would become "
                        "training images; choose another --out")
    config = config_for_run(run, resuming, new, given_model, given_diffusion, given_train)
    if resuming and model is not None and model != config.preset:
        raise UserError(f"--model {model} differs from the run being resumed ({config.preset}); "
                        "the model cannot change on resume")
    try:
        resolve_precision(config.train.precision, torch_device)
    except ValueError as e:
        raise UserError(str(e)) from None
    is_main = int(os.environ.get("RANK", "0")) == 0
    say = (lambda m: err.print(m, highlight=False, markup=False)) if is_main else (lambda m: None)

    with progress_bar(enabled=is_main) as bar, interrupted_says(lambda: "interrupted while decoding the images; "
                                                                  "nothing was written"):
        task = bar.add_task("decoding images", total=None)
        auto_channels = data is not None and not resuming and "channels" not in given_model
        data_set = load_data(data, config.model.image_size, None if auto_channels else config.model.channels,
                             progress=lambda i, n: bar.update(task, completed=i, total=n),
                             copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # each DDP process holds one
                             share=distributed.share(torch_device) if data is not None else None)
        bar.remove_task(task)
    if data_set.channels != config.model.channels:
        config = replace(config, model=replace(config.model, channels=data_set.channels))
        say("every image is grayscale: training a 1-channel model (--channels 3 keeps RGB)")
    if is_main:
        for line in data_notes(data_set, config.model.image_size, from_folder=data is not None):
            err.print(line, highlight=False, soft_wrap=True)

    stop = install_stop_handler(announce=is_main)
    say(f"run folder {run}" + (f" (resuming, on its data: {data})" if data_from_run and data else
                                 " (resuming)" if resuming else
                                 " (new: --resume auto found no run to continue)" if resume == "auto" else ""))
    with progress_bar("loss", "rate", enabled=is_main) as bar:
        fit_steps = budget is not None and "steps" not in given_train  # the run sets them (--max-time's help)
        task = bar.add_task("training", total=None if fit_steps else config.train.steps, loss="loss  -", rate="",
                            deadline=time.monotonic() + budget if budget else None)
        progress = TrainingProgress(bar, task, config.train.batch_size * config.train.grad_accum, budget)
        hooks = Hooks(progress=progress.update if is_main else (lambda r: None),
                      log=lambda m: bar.console.print(m, highlight=False, markup=False) if is_main else None,
                      should_stop=lambda step: stop["requested"])
        options = Options(device=torch_device, save_every=save_every, sample_every=sample_every,
                          max_time=budget, fit_steps=fit_steps, resume=resuming, compile=compile,
                          cuda_graph=cuda_graph)
        fresh = not run.exists()
        try:
            with claim(run) if is_main else nullcontext():
                result = run_training(config, data_set, run, options, hooks)
        except BaseException as e:
            if fresh and run.is_dir() and not any(run.iterdir()):
                run.rmdir()  # a run that failed before writing anything leaves no empty run folder behind
            if isinstance(e, OSError):  # a full disk, say: every checkpoint is written to a temporary file and renamed
                raise OSError(e.errno, f"{e.strerror or e}; the last checkpoint saved, if any, is intact",
                              e.filename) from None
            raise
    if result.stopped_by == "signal":
        unfitted = fit_steps and all(r["steps"] is None for r in result.records)
        say(f"stopped at step {result.step}; checkpoint saved. Resume with: "
            f"diffuse train --resume {run}" + (" --max-time TIME" if unfitted else ""))
        raise typer.Exit(130)
    say(f"done: step {result.step} ({'time budget reached' if result.stopped_by == 'time' else 'all steps'}); "
        f"weights in {run / 'model.safetensors'}, samples in {run / 'samples'}")


# -- sample -------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  diffuse sample -n 16                   # newest checkpoint, default sampler\n\n"
             "  diffuse sample --sampler ddim --steps 50 --eta 0 --seed 3\n\n"
             "  diffuse sample --checkpoint checkpoints/run/model.safetensors --trajectory\n\n"
             "  diffuse sample -n 50000 --out fid/     # for an FID; saved as they come")
def sample(
    n: int = typer.Option(16, "-n", "--num", help="How many images."),
    checkpoint: Optional[Path] = typer.Option(None, help="model.safetensors, a run folder, or a folder of runs (the newest). \\[default: newest under ./checkpoints]"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNGs. \\[default: samples/<run>-step<N>-<sampler>-<steps>steps-seed<seed>]"),
    sampler: str = typer.Option("dpm++3m-sde", help="ddpm, ddim, dpm++2m, dpm++3m, dpm++2m-sde, dpm++3m-sde, unipc or heun."),
    steps: int = typer.Option(25, help="Sampler steps (heun makes 2 network calls a step, less one)."),
    spacing: Optional[str] = typer.Option(None, help="trailing, quadratic, karras or logsnr. \\[default: the sampler's paper's]"),
    eta: Optional[float] = typer.Option(None, help="ddim, dpm++*: fresh noise per step, 0 = deterministic, 1 = DDPM-like (ddim: at most 1). \\[default: 0; 1 for the -sde ones]"),
    variance: Optional[str] = typer.Option(None, help="ddpm only: 'posterior' (β̃_t) or 'beta' (β_t). \\[default: posterior]"),
    seed: int = typer.Option(0, help="Image i uses seed+i, so results do not depend on --batch-size."),
    batch_size: int = typer.Option(64, help="Images per network call."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Also save trajectory.png and trajectory.gif (x_t and predicted x_0)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 (GPUs) or auto (as train picks) for the network."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph",
                                    help="On CUDA, replay each network call as a CUDA graph; off to debug."),
) -> None:
    """Generate images from a trained checkpoint: n PNGs and grid.png (of the first 64)."""
    from .samplers import SAMPLERS, Spacing, Variance

    require_positive(n=n, steps=steps, batch_size=batch_size)
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if spacing is not None:
        check_choice(spacing, Spacing, "spacing")
    check_choice(precision, Precision, "precision")
    options = {name: value for name, value in (("eta", eta), ("variance", variance)) if value is not None}
    for name in options.keys() - set(SAMPLERS[sampler].options):
        takers = [s for s, info in SAMPLERS.items() if name in info.options]
        raise UserError(f"--{name} does not apply to {sampler}; it applies to {', '.join(takers)}")
    if eta is not None and eta < 0:
        raise UserError("--eta must be at least 0")
    if sampler == "ddim" and eta is not None and eta > 1:
        raise UserError(f"--eta {eta} is above 1: ddim's step has no room for more noise than DDPM's (eta 1)")
    if variance is not None:
        check_choice(variance, Variance, "variance")

    import torch

    from .checkpoint import load_model, resolve_checkpoint
    from .data import grid_upscale, make_grid, save_gif, save_png, to_uint8
    from .device import memory_available
    from .generate import fitting_batch, generate_batches

    path = resolve_checkpoint(checkpoint)
    torch_device = compute_device(device)
    net, config, info = load_model(path, torch_device)
    if steps > config.diffusion.timesteps:
        raise UserError(f"--steps {steps} is more than the model's {config.diffusion.timesteps} diffusion steps")
    if torch_device.type == "cpu":  # where memory runs out, the system kills the process
        fits = fitting_batch(net, min(batch_size, n), memory_available())
        if fits < min(batch_size, n):
            err.print(f"note: sampling {fits} image{'s' * (fits != 1)} at a time, which fits in the memory available "
                      f"(--batch-size {batch_size} would not; the images are the same either way)", highlight=False)
            batch_size = fits
    trained = f"-step{info['step']}" if isinstance(info.get("step"), int) else ""  # more training: a new folder
    folder = out_dir or Path("samples") / f"{path.parent.name}{trained}-{sampler}-{steps}steps-seed{seed}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; name a folder for the images with --out")
    if not folder.exists() and folder.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--out {folder} names the folder for the PNGs (and grid.png), not a file: "
                        f"e.g. --out {folder.with_suffix('')}")
    frames: list = []

    def record(i: int, x_t, x0) -> None:
        frames.append((to_uint8(x_t[0]), to_uint8(x0[0])))

    start, written, shown = time.perf_counter(), 0, []
    width = max(4, len(str(n - 1)))  # 0000.png ...: names sort in order however many there are
    def kept() -> str:
        if written == 0:
            return "interrupted before the first batch was done; no images were written"
        return f"interrupted; the {written} image{'s' * (written != 1)} made so far are in {folder}/"

    with progress_bar() as bar, interrupted_says(kept):
        task = bar.add_task(f"sampling ({sampler})", total=None)
        for batch in generate_batches(net, config, n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                                      spacing=spacing, precision=precision, callback=record if trajectory else None,
                                      progress=lambda i, total: bar.update(task, completed=i, total=total),
                                      cuda_graph=cuda_graph, log=lambda m: bar.console.print(m, highlight=False,
                                                                                            markup=False),
                                      **options):
            for image in batch:  # written as each batch is done: an interrupted run keeps what it made
                save_png(image, folder / f"{written:0{width}d}.png")
                written += 1
            shown.append(batch[:GRID_MAX - sum(map(len, shown))])
    elapsed = time.perf_counter() - start
    upscale = grid_upscale(config.model.image_size)
    save_png(make_grid(torch.cat(shown)), folder / "grid.png", upscale)
    if trajectory:
        frames = frames[:len(frames) // -(-n // batch_size)]  # the first batch's steps
        picks = sorted({round(k * (len(frames) - 1) / 9) for k in range(10)})
        strip = make_grid(torch.stack([frames[k][0] for k in picks] + [frames[k][1] for k in picks]), nrow=len(picks))
        save_png(strip, folder / "trajectory.png", upscale)
        save_gif([make_grid(torch.stack(f), nrow=2) for f in frames], folder / "trajectory.gif")
    nfe = SAMPLERS[sampler].nfe(steps)
    out.print(f"{sampler}, {steps} steps, {nfe} network calls per batch, {elapsed / n * 1000:.0f} ms per image "
              f"({elapsed:.1f} s in all) from {path}", highlight=False)
    grid = "grid.png" if n <= GRID_MAX else f"grid.png (the first {GRID_MAX})"
    out.print(f"wrote {n} image{'s' * (n != 1)} and {grid} to {folder}/"
              + (" (+ trajectory.png, trajectory.gif)" if trajectory else ""), highlight=False)


# -- noise --------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  diffuse noise photo.png --t 500\n\n"
             "  diffuse noise photo.png --t 0 --t 250 --t 500 --t 1000 --schedule cosine\n\n"
             "  diffuse noise photo.png --t 0 --t 500 --image-size 32   # as a 32x32 model sees it")
def noise(
    image: Path = typer.Argument(..., help="An image file."),
    t: List[int] = typer.Option([500], "--t", help="Forward steps to apply (0 = the image, T = pure noise); repeat for a strip."),
    schedule: str = typer.Option(DiffusionConfig.schedule, help="linear, cosine or sigmoid."),
    timesteps: int = typer.Option(DiffusionConfig.timesteps, help="Diffusion steps T."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output PNG. \\[default: <image>_t<...>.png here]"),
    seed: int = typer.Option(0, help="Seed of the noise ε (the same ε at every t)."),
    image_size: Optional[int] = typer.Option(None, help="Resize (short side) and centre-crop as train does, then "
                                             "enlarge to be seen. \\[default: the image's own size, up to --max-side]"),
    max_side: int = typer.Option(1024, help="Without --image-size, shrink an image whose long side is longer to "
                                 "this many pixels (0: never), so that a photo's strip stays a PNG you can open."),
) -> None:
    """Show what the forward process q(x_t | x_0) does to an image, at its own size or a training size."""
    check_choice(schedule, Schedule, "schedule")
    if timesteps < 2:
        raise UserError(f"--timesteps must be at least 2, not {timesteps}")
    bad = [k for k in t if not 0 <= k <= timesteps]
    if bad:
        raise UserError(f"--t {bad[0]} is outside [0, {timesteps}] (0 is the clean image, {timesteps} pure noise)")
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be at least 1, not {image_size}")
    if max_side < 0:
        raise UserError(f"--max-side must be 0 (never shrink) or more, not {max_side}")
    if image.is_dir():
        raise UserError(f"{image}: is a folder; give one image file")
    if not image.is_file():
        raise UserError(f"{image}: no such file")
    target = out_path or Path(f"{image.stem}_t{'-'.join(map(str, t))}.png")
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; name the PNG to write, e.g. --out {target / 'noise.png'}")
    if target.suffix.lower() != ".png":
        raise UserError(f"--out {target}: diffuse noise writes a PNG; name it {target.with_suffix('.png')}")
    import torch

    from .data import (TooLarge, decode_image, grid_upscale, image_dimensions, labelled_strip, read_image, save_png,
                       to_model, to_uint8)
    from .schedule import NoiseSchedule

    try:
        if image_size is None:
            own, x0 = image_dimensions(image), to_model(read_image(image, max_side=max_side))[None]
        else:
            x0 = to_model(decode_image(image, image_size))[None]
    except TooLarge as e:
        hint = "; --max-side N reads a JPEG at a reduced scale" if image_size is None and not max_side else ""
        raise UserError(f"{image}: too large to show ({e}){hint}") from None
    except Exception as e:  # any decoder failure is the user's file, not our bug
        raise UserError(f"{image}: cannot read as an image ({e})") from None
    sched = NoiseSchedule.make(schedule, timesteps)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    zoom = grid_upscale(image_size) if image_size else 1  # nearest, so that each pixel of noise stays a pixel
    panels = [to_uint8(x0[0] if k == 0 else sched.q_sample(x0, torch.tensor([k - 1]), eps)[0])
              .repeat_interleave(zoom, 1).repeat_interleave(zoom, 2) for k in t]
    save_png(panels[0] if len(t) == 1 else labelled_strip(panels, [f"t = {k}" for k in t]), target)
    if image_size:
        size = f"{image_size}x{image_size} as a model sees it"
    else:
        size = f"{x0.shape[-1]}x{x0.shape[-2]}"
        if (x0.shape[-1], x0.shape[-2]) != own:
            size += f", shrunk from {own[0]}x{own[1]}; --max-side 0 keeps every pixel"
    out.print(f"wrote {target} ({size}; {schedule} schedule, T = {timesteps})", highlight=False)


# -- inspect ------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  diffuse inspect checkpoints/run/model.safetensors\n\n"
             "  diffuse inspect checkpoints/run --json")
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors checkpoint, or a run folder (in a folder of runs, the newest)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what a checkpoint holds, reading its header only."""
    from .checkpoint import read_header, read_metadata, resolve_checkpoint
    from .files import STATE_FILE

    path = resolve_checkpoint(path)
    header = read_header(path)
    fmt = (header.get("__metadata__") or {}).get("format")
    config, info = read_metadata(path, fmt if fmt in ("diffuse/model", "diffuse/training-state") else "diffuse/model",
                                 header)
    info.pop("param_groups", None)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    facts = {"file": str(path), "format": fmt, "file_size_bytes": path.stat().st_size, "tensors": len(tensors),
             "preset": config.preset, **info, "config": to_dict(config)}
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    table = Table(title=str(path), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    size_mb = facts["file_size_bytes"] / 1e6
    rows = [("kind", "weights to sample with (EMA)" if fmt == "diffuse/model" else f"resume state ({STATE_FILE})"),
            ("preset", config.preset), ("parameters", f"{info.get('parameters', 0):,}"),
            ("steps trained", f"{info.get('step', '?'):,}" if isinstance(info.get("step"), int) else "?"),
            ("images seen", f"{info.get('images_seen', 0):,}"),
            ("image size", f"{config.model.image_size}x{config.model.image_size}, {config.model.channels} channel(s)"),
            ("schedule", f"{config.diffusion.schedule}, T = {config.diffusion.timesteps}"),
            ("objective", config.diffusion.objective), ("data", f"{info.get('data', '?')} ({info.get('data_size', '?')} images)"),
            ("file size", f"{size_mb:.1f} MB, {len(tensors)} tensors")]
    rows += [(f"model.{k}", str(v)) for k, v in to_dict(config.model).items()]
    rows += [(f"train.{k}", "not yet fitted to --max-time" if (k, v) == ("steps", UNFITTED_STEPS) else str(v))
             for k, v in to_dict(config.train).items()]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def version_callback(value: bool) -> None:
    if value:
        print(f"diffuse {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Train a denoising diffusion model (DDPM) on a folder of images, and sample from it."""


def main() -> None:
    """Entry point: known failures become one line on stderr and a non-zero exit, never a traceback."""
    from .errors import CheckpointError, DataError, RunError

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except (UserError, ConfigError, DataError, CheckpointError, RunError) as e:
        _exit_with(str(e), 2)
    except Interrupted as e:
        _exit_with(str(e), 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _exit_with("interrupted", 130)
    except Exception as e:  # click's usage errors, OS errors, the engine's ValueErrors
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a click exception (typer may vendor click)
            parents = {str(Path(arg).parent) for arg in sys.argv[2:] if Path(arg).is_file()}
            if "unexpected extra argument" in str(e) and sys.argv[1:2] == ["train"] and parents:  # photos/*.jpg
                folder = parents.pop() if len(parents) == 1 else "photos"
                _exit_with("diffuse train takes one folder, not its files (a pattern such as photos/*.jpg names "
                           f"each file); pass the folder: diffuse train {folder}", 2)
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, OSError):
            _exit_with(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        if isinstance(e, (ValueError, RuntimeError)) and not os.environ.get("DIFFUSE_DEBUG"):
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in message:
                message = (message.rstrip(".") + "; try a smaller --batch-size (train: with --grad-accum to keep the "
                           "effective batch) or a smaller --image-size or --model")
            _exit_with(message, 1)
        raise


def _exit_with(message: str, code: int) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
