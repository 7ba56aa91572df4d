"""The `diffuse` command: each command parses its options, calls the Python API (api.py), and presents the result.

torch is imported inside the commands, so that `diffuse --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .. import __version__
from ..api_settings import INTERPOLATE_STEPS, DiffusionConfig, SampleConfig, parse_duration, require_positive
from . import options as opt
from .convert import COMMANDS as CONVERT_COMMANDS
from .evaluate import COMMANDS as EVAL_COMMANDS
from .ema import COMMANDS as EMA_COMMANDS
from .console import (Interrupted, TrainDisplay, err, interrupted_says, out, process_started, progress_bar,
                      styled)
from ..errors import DiffuseError, UsageError, out_of_memory

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Train a denoising diffusion model (DDPM) on a folder of images, and sample from it.")


def use_device(name: str, threads: int | None = None) -> None:
    """Check the device and --threads now, and ready the device for work (api.prepare_device)."""
    require_positive(threads=threads)
    from .. import api

    api.prepare_device(name, threads)


@app.command(epilog="Examples:\n\n  diffuse train                          # built-in shapes, default settings\n\n"
             "  diffuse train ./photos --image-size 64 --max-time 2h\n\n"
             "  diffuse train --resume auto --out checkpoints/mine   # continue a stopped run\n\n"
             "  diffuse train ./photos --devices 4     # four processes (DDP) on this machine\n\n"
             "  diffuse train ./photos --from checkpoints/shapes-run   # fine-tune a trained model")
def train(data: opt.Data = None, image_size: opt.ImageSize = None, channels: opt.Channels = None,
          model: opt.Preset = None, schedule: opt.ScheduleOpt = None, objective: opt.ObjectiveOpt = None,
          timesteps: opt.Timesteps = None, dropout: opt.Dropout = None, batch_size: opt.BatchSize = None,
          steps: opt.TrainSteps = None, max_time: opt.MaxTime = None, lr: opt.Lr = None,
          lr_schedule: opt.LrScheduleOpt = None, warmup: opt.Warmup = None, grad_accum: opt.GradAccum = None,
          grad_clip: opt.GradClip = None, min_snr_gamma: opt.MinSnrGamma = None, ema_max_decay: opt.EmaMaxDecay = None,
          start_from: opt.StartFrom = None, posthoc_ema: opt.PosthocEma = None, hflip: opt.Hflip = None, no_hflip: opt.NoHflip = False,
          classes: opt.ClassesOpt = None,
          class_dropout: opt.ClassDropout = None, precision: opt.TrainPrecision = None, seed: opt.Seed = None,
          out_dir: opt.RunOut = None, resume: opt.Resume = None, save_every: opt.SaveEvery = None,
          sample_every: opt.SampleEvery = None, eval_every: opt.EvalEvery = None, eval_n: opt.EvalN = 1000,
          eval_ema: opt.EvalEma = None, device: opt.Device = "auto", compile: opt.Compile = False,
          cuda_graph: opt.CudaGraph = True, checkpointing: opt.Checkpointing = False,
          cache_dir: opt.DataCache = None, no_cache: opt.NoCache = False, devices: opt.Devices = 1,
          threads: opt.Threads = None) -> None:
    """Train a diffusion model; writes checkpoints/<run>/ (weights, sample grids, metrics)."""
    from .launch import launch_devices

    if devices > 1:
        return launch_devices(devices, device, sys.argv[1:])
    folder = opt.one_folder(data)
    require_positive(devices=devices, save_every=save_every, sample_every=sample_every, eval_every=eval_every)
    settings = opt.given(image_size=image_size, channels=channels, schedule=schedule, objective=objective,
                     timesteps=timesteps, dropout=dropout, batch_size=batch_size, steps=steps, lr=lr,
                     lr_schedule=lr_schedule, warmup=warmup, grad_accum=grad_accum, grad_clip=grad_clip,
                     min_snr_gamma=min_snr_gamma, ema_max_decay=ema_max_decay, precision=precision, seed=seed,
                     classes=classes, class_dropout=class_dropout)
    if posthoc_ema is not None:
        settings["posthoc_ema"] = opt.parse_lengths(posthoc_ema)
    if hflip is not None or no_hflip:  # 'auto' is None, and is still a choice made (on resume: probe again)
        settings["hflip"] = opt.parse_hflip("off" if no_hflip else hflip)
    seconds = parse_duration(max_time) if max_time else None
    if folder is not None and not Path(folder).exists():
        raise UsageError(f"{folder}: no such file or folder")
    use_device(device, threads)
    from .. import api

    confirm = (lambda q: typer.confirm(q, default=True, err=True)) if sys.stdin.isatty() else None
    sized = (model is None and seconds is not None and steps is None  # the preset is chosen for the time (sizing.py)
             and start_from is None)
    named = model or ("" if sized else "small")
    if start_from is not None:  # the run is named for the model it starts from
        named = "from-" + (start_from if start_from.is_dir() else start_from.parent).name
    run, resuming = api.run_folder(out_dir, resume, folder, named, confirm)
    started = process_started()  # --max-time is the whole command's
    display = TrainDisplay(seconds, enabled=int(os.environ.get("RANK", "0")) == 0, started=started)
    display.log(f"run folder {run}" + (" (resuming)" if resuming else
                                       " (new: --resume auto found no run to continue)" if resume == "auto" else ""))
    with display, interrupted_says(lambda: "interrupted while decoding the images; nothing was written"):
        trained = api.train(folder, run, resume=resuming, preset=model, max_time=seconds, device=device,
                            compile=compile, cuda_graph=cuda_graph, checkpointing=checkpointing,
                            cache=False if no_cache else cache_dir or True,
                            save_every=save_every, sample_every=sample_every,
                            eval_every=eval_every, eval_n=eval_n,
                            eval_ema=opt.parse_lengths(eval_ema, "--eval-ema") if eval_ema else (),
                            hooks=display.hooks(), started=started, start_from=start_from, **settings)
    result = trained.training
    if result.stopped_by == "signal":
        display.log(f"stopped at step {result.step}; checkpoint saved. Resume with: diffuse train --resume {run}"
                    + ("" if result.fitted else " --max-time TIME"))
        raise typer.Exit(130)
    display.log(f"done: step {result.step} ({'time budget reached' if result.stopped_by == 'time' else 'all steps'});"
                f" weights in {run / 'model.safetensors'}, samples in {run / 'samples'}")


@app.command(epilog="Examples:\n\n  diffuse distill checkpoints/run                 # a student that samples in 4 steps\n\n"
             "  diffuse distill checkpoints/run --steps 2 --max-time 30m\n\n"
             "  diffuse distill checkpoints/run --resume --out checkpoints/run-distilled-4steps")
def distill(run: opt.DistillRun, steps: opt.DistillSteps = 4, teacher_steps: opt.TeacherSteps = None,
            guidance: opt.DistillGuidance = 1.0, train_steps: opt.DistillTrainSteps = None, max_time: opt.MaxTime = None,
            batch_size: opt.BatchSize = None, lr: opt.DistillLr = None, warmup: opt.DistillWarmup = None,
            out_dir: opt.DistillOut = None,
            resume: opt.DistillResume = False, device: opt.Device = "auto", threads: opt.Threads = None) -> None:
    """Distill a trained model into a student that samples in a few steps; writes a run folder like train's."""
    seconds = parse_duration(max_time) if max_time else None
    if resume and out_dir is None:
        raise UsageError("--resume continues a distillation: name its run folder with --out")
    use_device(device, threads)
    from .. import api

    started = process_started()
    display = TrainDisplay(seconds, started=started)
    with display, interrupted_says(lambda: "interrupted before the first step; nothing was written"):
        trained = api.distill(run, out_dir, steps=steps, teacher_steps=teacher_steps, guidance=guidance, resume=resume,
                              hooks=display.hooks(), max_time=seconds, device=device, started=started,
                              **opt.given(train_steps=train_steps, batch_size=batch_size, lr=lr, warmup=warmup))
    result, folder = trained.training, trained.training.run_dir
    if result.stopped_by == "signal":
        display.log(f"stopped at step {result.step}; checkpoint saved. Resume with: diffuse distill {run} --resume "
                    f"--out {folder}")
        raise typer.Exit(130)
    display.log(f"done: step {result.step}; the student in {folder / 'model.safetensors'} samples in "
                f"{trained.config.distill.steps} steps (diffuse sample --checkpoint {folder})")


@app.command(epilog="Examples:\n\n  diffuse sample -n 16                   # newest checkpoint, default sampler\n\n"
             "  diffuse sample --sampler ddim --steps 50 --eta 0 --seed 3\n\n"
             "  diffuse sample --init sketch.png --strength 0.6 -n 8 --class dog   # variations of a sketch\n\n"
             "  diffuse sample --init photo.png --mask hole.png -n 4   # fill the mask's white part\n\n"
             "  diffuse sample -n 50000 --out fid/     # for an FID; saved as they come")
def sample(n: opt.Count = None, checkpoint: opt.Checkpoint = None, out_dir: opt.SamplesOut = None,
           sampler: opt.Sampler = None, steps: opt.SampleSteps = None, spacing: opt.SpacingOpt = None,
           eta: opt.Eta = None, variance: opt.VarianceOpt = None, seed: opt.Seed = None, class_: opt.ClassName = None,
           guidance: opt.Guidance = None, threshold: opt.ThresholdOpt = None, init: opt.Init = None,
           strength: opt.Strength = None, mask: opt.Mask = None, resample_jumps: opt.ResampleJumps = None,
           batch_size: opt.BatchSize = None, trajectory: opt.Trajectory = False, device: opt.Device = "auto",
           precision: opt.SamplePrecision = None, cuda_graph: opt.CudaGraph = True, threads: opt.Threads = None) -> None:
    """Generate images from a trained checkpoint, or edit images with it: PNGs and grid.png."""
    settings = SampleConfig.of(**opt.given(sampler=sampler, steps=steps, spacing=spacing, eta=eta, variance=variance,
                                           seed=seed, batch_size=batch_size, precision=precision, guidance=guidance,
                                           threshold=threshold, classes=class_, strength=strength,
                                           resample_jumps=resample_jumps)).check(n=n)  # before a model is loaded
    use_device(device, threads)
    from .. import api

    job = api.SampleRun(api.load(checkpoint, device), n, settings, out_dir, init, mask, trajectory)  # checked here
    kept = lambda k=job: ("interrupted before the first batch was done; no images were written" if not k.written  # noqa
                          else f"interrupted; the {k.written} image{'s' * (k.written != 1)} made so far are in {k.folder}/")
    with progress_bar() as bar, interrupted_says(kept):
        task = bar.add_task(f"sampling ({settings.sampler.name})", total=None)
        say = lambda m: bar.console.print(styled(m), highlight=False, soft_wrap=True)  # noqa: E731
        for note in job.notes:
            say(note)
        job.run(api.SampleHooks(progress=lambda i, total: bar.update(task, completed=i, total=total), log=say,
                                cuda_graph=cuda_graph))
    for line in job.summary():
        out.print(line, highlight=False)


@app.command(epilog="Examples:\n\n  diffuse noise photo.png --t 500\n\n"
             "  diffuse noise photo.png --t 0 --t 250 --t 500 --t 1000 --schedule cosine\n\n"
             "  diffuse noise photo.png --t 0 --t 500 --image-size 32   # as a 32x32 model sees it")
def noise(image: opt.Image, t: opt.Steps = [500], schedule: opt.ScheduleOpt = None, timesteps: opt.Timesteps = None,
          out_path: opt.NoiseOut = None, seed: opt.NoiseSeed = 0, image_size: opt.NoiseImageSize = None,
          max_side: opt.MaxSide = 1024) -> None:
    """Show what the forward process q(x_t | x_0) does to an image, at its own size or a training size."""
    target = out_path or Path(f"{image.stem}_t{'-'.join(map(str, t))}.png")
    schedule = schedule or DiffusionConfig.schedule
    timesteps = DiffusionConfig.timesteps if timesteps is None else timesteps  # 0 is refused, not the default
    from .. import api

    said = api.write_noise(image, t, target, schedule, timesteps, seed, image_size, max_side)
    out.print(f"wrote {target} ({said.worded(opt.flag)}; {schedule} schedule, T = {timesteps})", highlight=False)


@app.command(epilog="Examples:\n\n  diffuse explore                               # newest checkpoint, a training image\n\n"
             "  diffuse explore photo.png --checkpoint checkpoints/run --open\n\n"
             "  diffuse explore --class circle                # walk back into a circle")
def explore(image: opt.ExploreImage = None, checkpoint: opt.Checkpoint = None, class_: opt.OneClass = None,
            guidance: opt.Guidance = None, frames: opt.Frames = 60, seed: opt.NoiseSeed = 0,
            out_path: opt.ExploreOut = Path("explore.html"), open_page: opt.Open = False,
            device: opt.Device = "auto", threads: opt.Threads = None) -> None:
    """Write the time slider: one HTML page where an image dissolves into static and the model walks back out."""
    use_device(device, threads)
    from .. import api

    api.explorer_path(out_path)  # before any work
    model = api.load(checkpoint, device)
    with progress_bar() as bar:
        bar.add_task("computing the frames", total=None)
        shown = api.explore(model, image, frames, seed, class_, **opt.given(guidance=guidance))
    path = api.write_explorer(shown, out_path, f"diffuse: {model.path.parent.name}, the time slider")
    size = shown.forward.shape[-1]
    out.print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB: {len(shown.ks)} values of t, {size}x{size}); open it "
              "in a browser", highlight=False)
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command(epilog="Examples:\n\n  diffuse interpolate a.png b.png --frames 9   # a strip (and GIF) from a to b\n\n"
             "  diffuse interpolate --seeds 3 17 --frames 9   # between two samples\n\n"
             "  diffuse interpolate a.png b.png --class dog --checkpoint checkpoints/run")
def interpolate(images: opt.TwoImages = None, seeds: opt.Seeds = None, frames: opt.InterpolateFrames = 9,
                steps: opt.InterpolateSteps = INTERPOLATE_STEPS, class_: opt.OneClass = None,
                checkpoint: opt.Checkpoint = None, out_dir: opt.InterpolateOut = None, device: opt.Device = "auto",
                threads: opt.Threads = None) -> None:
    """Walk from one image (or seed) to another through the model's noise: DDIM inversion, slerp, DDIM back."""
    seeds = seeds if seeds and None not in seeds else None
    if len(images or []) not in (0, 2) or not images and seeds is None:
        raise UsageError(f"give two images, or --seeds A B, to interpolate between (not {len(images or [])} images)")
    use_device(device, threads)
    from .. import api

    model = api.load(checkpoint, device)
    a, b = images or (None, None)
    folder = out_dir or api.interpolation_folder_name(model, a, b, seeds, steps)
    with progress_bar() as bar:
        task = bar.add_task("interpolating (ddim)", total=None)
        api.interpolate(model, a, b, frames, seeds, steps, class_,
                        progress=lambda i, total: bar.update(task, completed=i, total=total), out=folder)
    how = f"DDIM inversion of {a} and {b}" if images else f"the noises of seeds {seeds[0]} and {seeds[1]}"
    out.print(f"wrote {frames} frames, strip.png and strip.gif to {folder}/ ({how}, spherical interpolation, "
              f"{steps} DDIM steps back{f', class {class_}' if class_ else ''})", highlight=False)


@app.command(epilog="Examples:\n\n  diffuse inspect checkpoints/run/model.safetensors\n\n"
             "  diffuse inspect checkpoints/run --json")
def inspect(path: opt.CheckpointPath, as_json: opt.AsJson = False) -> None:
    """Show what a checkpoint holds, reading its header only."""
    from .. import api
    from .console import checkpoint_table

    facts, config = api.inspect(path)
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    out.print(checkpoint_table(facts, config))


for name, examples, command in CONVERT_COMMANDS + EVAL_COMMANDS + EMA_COMMANDS:  # import, export, eval, ema
    app.command(name, epilog=examples)(command)


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
    sys.argv = opt.bare_hflip(sys.argv)
    for stream in (sys.stdout, sys.stderr):
        # a terminal or log file in a legacy encoding (a Windows code page, Latin-1, ASCII) cannot show σ or γ:
        # they are written as '?' rather than ending the command part way
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except DiffuseError as e:
        _exit_with(e.worded(opt.flag), e.exit_code)
    except Interrupted as e:
        _exit_with(str(e), 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _exit_with("interrupted", 130)
    except Exception as e:  # click's usage errors, OS errors, and what torch raises
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a click exception (typer may vendor click)
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, OSError):
            _exit_with(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        if isinstance(e, (ValueError, RuntimeError)) and not os.environ.get("DIFFUSE_DEBUG"):
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if out_of_memory(e):
                message = message.rstrip(".") + "; try a smaller --batch-size or --image-size"
            _exit_with(message, 1)
        raise


def _exit_with(message: str, code: int) -> None:
    from rich.text import Text

    err.print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)
    sys.exit(code)
