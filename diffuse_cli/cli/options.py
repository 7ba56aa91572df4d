"""The CLI's options, each declared once. Their help lists the engine's own choices (the Literal types
of config.py) and defaults (its dataclasses), so that help can never disagree with what runs.

A training option left unset is None and keeps the dataclass default (or, on --resume, the run's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional, get_args

import typer

from ..api_settings import (BUILTIN_IMAGE_SIZE, INTERPOLATE_STEPS, PRESETS, RESAMPLE_JUMPS, Config, DiffusionConfig,
                            LRSchedule, ModelConfig, Objective, Precision, SampleConfig, SamplerChoice, SamplerName,
                            Schedule, Spacing, Threshold, TrainConfig, Variance)
from ..errors import UsageError


def one_of(literal: Any) -> str:
    """'a, b or c' from a Literal type."""
    names = list(get_args(literal))
    return ", ".join(names[:-1]) + " or " + names[-1]


def default(value: Any) -> str:
    return f" \\[default: {value}]"


T, S, H = TrainConfig, SampleConfig, SamplerChoice

# -- every command that runs a network --------------------------------------------------------
Device = Annotated[str, typer.Option(help="auto ($DIFFUSE_DEVICE where set, else CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for torch's operations. \\[default: the cores other "
                                                "programs leave free, checked every second (OMP_NUM_THREADS, where set)]")]
Seed = Annotated[Optional[int], typer.Option(help="Seed: training's weights, data order and noise; sampling's "
                                             f"image i uses seed+i, whatever --batch-size.{default(S.seed)}")]
CudaGraph = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph",
                                         help="On CUDA, replay each step or network call as one CUDA graph; off to debug.")]
DataCache = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where a folder's decoded images are kept, for "
                                                   "later runs to read without decoding. \\[default: $DIFFUSE_CACHE, "
                                                   "else ~/.cache/diffuse]", show_default=False)]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Decode the images into memory (or on demand) without "
                                       "keeping them in the cache.")]
Checkpointing = Annotated[bool, typer.Option("--checkpointing", help="Recompute each residual block's activations in "
                                             "the backward instead of keeping them: large images on a small GPU, "
                                             "for one more forward of each block per step.")]
Checkpoint = Annotated[Optional[Path], typer.Option(help="model.safetensors, a run folder, or a folder of runs (the "
                                                    "newest). \\[default: newest under ./checkpoints]")]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per step (train: global, split across processes "
                                                  f"under DDP{default(T.batch_size)}; sample: per network call"
                                                  f"{default(S.batch_size)}).")]

# -- train ------------------------------------------------------------------------------------
Data = Annotated[Optional[List[str]], typer.Argument(metavar="DATA", help="Folder of images (searched recursively). Default: "
                                                     "built-in shapes; on --resume, the run's own.", show_default=False)]
ImageSize = Annotated[Optional[int], typer.Option(help="Train at this resolution (short side resized, centre crop)."
                                                  f" \\[default: {ModelConfig.image_size}; {BUILTIN_IMAGE_SIZE} for "
                                                  "the built-in shapes]")]
Channels = Annotated[Optional[int], typer.Option(help="3 for RGB, 1 for grayscale. \\[default: 1 if every image is "
                                                 "grayscale, else 3]")]
Preset = Annotated[Optional[str], typer.Option("--model", "--preset", help=f"U-Net width and depth: {', '.join(PRESETS)}."
                                               " The image size shapes its levels and attention (docs/training.md)."
                                               f" \\[default: {Config.preset}; with --max-time and no --steps, the "
                                               "widest that gets enough steps in the time here]")]
ScheduleOpt = Annotated[Optional[str], typer.Option("--schedule", help=f"Noise schedule: {one_of(Schedule)}."
                                                    f"{default(DiffusionConfig.schedule)}")]
ObjectiveOpt = Annotated[Optional[str], typer.Option("--objective", help=f"What the network predicts: "
                                                     f"{one_of(Objective)}.{default(DiffusionConfig.objective)}")]
Timesteps = Annotated[Optional[int], typer.Option(help=f"Diffusion steps T.{default(DiffusionConfig.timesteps)}")]
Dropout = Annotated[Optional[float], typer.Option(help="Dropout in residual blocks. \\[default: the preset's]")]
TrainSteps = Annotated[Optional[int], typer.Option(help=f"Optimizer steps to train for. \\[default: {T.steps}; with "
                                                   "--max-time, what the budget holds]")]
MaxTime = Annotated[Optional[str], typer.Option(help="Stop after this wall-clock time (90s, 10m, 2h, 1h30m), save "
                                                "and sample; without --steps, the LR decays over the steps that fit.")]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW). Not rescaled with batch or processes."
                                             f"{default(T.lr)}")]
LrScheduleOpt = Annotated[Optional[str], typer.Option("--lr-schedule", help=f"{one_of(LRSchedule)} (decay to 10%) "
                                                      f"after warm-up.{default(T.lr_schedule)}")]
Warmup = Annotated[Optional[int], typer.Option(help=f"Linear LR warm-up steps.{default(T.warmup)}")]
GradAccum = Annotated[Optional[int], typer.Option(help=f"Micro-batches per optimizer step.{default(T.grad_accum)}")]
GradClip = Annotated[Optional[float], typer.Option(help=f"Clip the gradient norm (0: off).{default(T.grad_clip)}")]
MinSnrGamma = Annotated[Optional[float], typer.Option(help=f"Min-SNR-γ loss weighting (0: off).{default(T.min_snr_gamma)}")]
EmaMaxDecay = Annotated[Optional[float], typer.Option(help=f"Upper bound of the EMA decay.{default(T.ema_max_decay)}")]
StartFrom = Annotated[Optional[Path], typer.Option("--from", help="Start from this model's weights (a run folder or "
                                                  "a model file, an imported diffusers model too): its network and "
                                                  "noise schedule, a new optimizer, EMA and learning-rate schedule; "
                                                  "the images are read at its size.", show_default=False)]
PosthocEma = Annotated[Optional[str], typer.Option("--posthoc-ema", help="Lengths (σ_rel) of the averages kept for "
                                                   "post-hoc EMA, comma-separated, or off: a few snapshots in "
                                                   "<run>/ema/, from which `diffuse ema` rebuilds the EMA of any "
                                                   "length after training. \\[default: 0.05,0.10]",
                                                   show_default=False)]
Hflip = Annotated[Optional[str], typer.Option("--hflip", help="Mirror training images left-right at random: auto "
                                              "(unless a quick probe finds the data has a handedness, as text and "
                                              "digits do), on or off. --hflip alone is on, --no-hflip off. "
                                              "\\[default: auto]", show_default=False)]
NoHflip = Annotated[bool, typer.Option("--no-hflip", help="The same as --hflip off.", hidden=True)]
TrainPrecision = Annotated[Optional[str], typer.Option("--precision", help=f"{one_of(Precision)}.{default(T.precision)}")]
RunOut = Annotated[Optional[Path], typer.Option("--out", help="Run folder. \\[default: checkpoints/<data>-<preset>-<time>]")]
Resume = Annotated[Optional[str], typer.Option(help="Run folder to continue, or 'auto' (--out, else the newest run).")]
SaveEvery = Annotated[Optional[int], typer.Option(help="Save the checkpoint every N steps (and at the end). "
                                                  "\\[default: every 500 steps, at most once a minute]")]
EvalEvery = Annotated[Optional[int], typer.Option(help="FID of --eval-n samples every N steps, against as many "
                                                  "training images: in metrics.jsonl and loss.png, and the best "
                                                  "weights kept as model_best.safetensors (needs the \\[eval] extra). "
                                                  "\\[default: off]", show_default=False)]
EvalEma = Annotated[Optional[str], typer.Option("--eval-ema", help="Score post-hoc EMAs of these lengths (σ_rel, "
                                                "comma-separated, e.g. 0.05,0.1,0.2) at each --eval-every FID "
                                                "instead of the run's EMA, rebuilt at that step from the snapshots; "
                                                "the best length's weights are kept as model_best.safetensors.",
                                                show_default=False)]
EvalN = Annotated[int, typer.Option(help="Samples each --eval-every FID is of (at most the data set's size).")]
SampleEvery = Annotated[Optional[int], typer.Option(help="Write samples/step_N.png every N steps (and at the end). "
                                                    "\\[default: every 500 steps, at most once a minute]")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="auto: when the images sit in two or more "
                                                   "subfolders of DATA, each is a class, and the model learns to draw "
                                                   f"the one asked for; off: ignore them.{default(T.classes)}")]
ClassDropout = Annotated[Optional[float], typer.Option(help="How often a conditional model is shown 'no class' "
                                                       "instead of the label, to learn the unconditional half that "
                                                       f"guidance needs.{default(T.class_dropout)}")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the network (the plain module is saved).")]
Devices = Annotated[int, typer.Option(help="Processes on this machine (DDP through torchrun); one GPU each on CUDA.")]

# --hflip's words and TrainConfig.hflip's values: auto leaves the choice to the data (mirror.py).
HFLIP = {"auto": None, "on": True, "off": False}


def parse_lengths(words: str, flag: str = "--posthoc-ema") -> tuple[float, ...]:
    """--posthoc-ema's (or --eval-ema's) lengths: '0.05,0.1' -> (0.05, 0.1); 'off' -> ()."""
    if words.strip() == "off":
        return ()
    try:
        return tuple(float(w) for w in words.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes lengths such as 0.05,0.10, or off; not {words!r}") from None


def parse_hflip(word: str) -> bool | None:
    if word not in HFLIP:
        raise UsageError(f"unknown hflip {word!r}; choose one of: {', '.join(HFLIP)}")
    return HFLIP[word]


# Settings whose flag is not "--" + their name with dashes (errors name settings: errors.DiffuseError).
FLAGS = {"n": "-n", "cuda_graph=False": "--no-cuda-graph", "classes='off'": "--classes off", "classes": "--class", "class_name": "--class", "name": "--sampler", "out": "--out", "preset": "--model", "start_from": "--from"}


def flag(setting: str) -> str:
    """The command-line flag of an engine setting: batch_size -> --batch-size."""
    return FLAGS.get(setting, "--" + setting.replace("_", "-"))


def given(**options: Any) -> dict[str, Any]:
    """The options set on the command line (an unset one is None), by their config field names."""
    return {name: value for name, value in options.items() if value is not None}


def one_folder(data: Optional[list[str]]) -> Optional[str]:
    """train's DATA: one folder. The shell hands over every file of `photos/*.jpg`: name the folder instead."""
    if not data or len(data) == 1:
        return data[0] if data else None
    parents = {str(Path(a).parent) for a in data if Path(a).is_file()}
    if not parents:
        raise UsageError(f"diffuse train takes one folder, not {len(data)}: {' '.join(data)}")
    folder = parents.pop() if len(parents) == 1 else "photos"
    raise UsageError("diffuse train takes one folder, not its files (a pattern such as photos/*.jpg names each file); "
                     f"pass the folder: diffuse train {folder}")


def bare_hflip(argv: list[str]) -> list[str]:
    """`--hflip` alone (a flag before it took a value) means `--hflip on`: at the end, or before another
    option or an existing path (`diffuse train --hflip photos`)."""
    def bare(i: int) -> bool:
        return i + 1 == len(argv) or argv[i + 1].startswith("-") or Path(argv[i + 1]).exists()
    return [w for i, a in enumerate(argv) for w in ([a, "on"] if i and a == "--hflip" and bare(i) else [a])]


# -- sample -----------------------------------------------------------------------------------
Count = Annotated[Optional[int], typer.Option("-n", "--num", help="How many images (of each class asked, of each "
                                             "init). \\[default: 16; 1 of each image of an --init folder]",
                                             show_default=False)]
SamplesOut = Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNGs. \\[default: samples/<run>-step"
                                                    "<N>-<sampler>-<steps>steps-seed<seed>]")]
Sampler = Annotated[Optional[str], typer.Option(help=f"{', '.join(get_args(SamplerName))}.{default(H.name)}")]
SampleSteps = Annotated[Optional[int], typer.Option(help="Sampler steps (heun makes 2 network calls a step, less one)."
                                                    f"{default(H.steps)}")]
SpacingOpt = Annotated[Optional[str], typer.Option("--spacing", help=f"{one_of(Spacing)}. \\[default: the sampler's "
                                                   "paper's]")]
Eta = Annotated[Optional[float], typer.Option(help="ddim, dpm++*: fresh noise per step, 0 = deterministic, 1 = "
                                              "DDPM-like (ddim: at most 1). \\[default: 0; 1 for the -sde ones]")]
VarianceOpt = Annotated[Optional[str], typer.Option("--variance", help=f"ddpm only: {one_of(Variance)} (β̃_t or β_t)."
                                                    " \\[default: posterior]")]
Trajectory = Annotated[bool, typer.Option("--trajectory", help="Also save trajectory.png and trajectory.gif (x_t and "
                                          "predicted x_0).")]
ClassName = Annotated[Optional[List[str]], typer.Option("--class", help="A conditional model's class to draw, by "
                                                       "name or index (repeat for several; -n of each); 'all': a row "
                                                       "of each. \\[default: none: any image]", show_default=False)]
Guidance = Annotated[Optional[float], typer.Option(help="Classifier-free guidance weight w with --class: 1 is the "
                                                   "plain conditional model, more follows the class more closely."
                                                   f"{default(S.guidance)}")]
ThresholdOpt = Annotated[Optional[str], typer.Option("--threshold", help=f"How the predicted image is kept in "
                                                     f"range: {one_of(Threshold)} (Imagen's, for strong --guidance)."
                                                     f"{default(H.threshold)}")]
Init = Annotated[Optional[Path], typer.Option("--init", help="Edit this image (or each image of a folder), resized "
                                             "and cropped as training does: SDEdit at --strength.", show_default=False)]
Strength = Annotated[Optional[float], typer.Option(help="With --init: how far into the noise the init goes, in (0, 1]: "
                                                   "low keeps it close, 1 is ordinary sampling (what `diffuse noise "
                                                   f"--t` shows at strength x T).{default(S.strength)}")]
Mask = Annotated[Optional[Path], typer.Option("--mask", help="With --init: inpaint the white part of this image, "
                                             "keeping the black part of the init exactly (RePaint).",
                                             show_default=False)]
ResampleJumps = Annotated[Optional[int], typer.Option(help="With --mask: times each stretch of the path is noised "
                                                      "back and run again, so that the fill agrees with what is kept "
                                                      f"(RePaint; each costs about one more sampling).{default(RESAMPLE_JUMPS)}")]
SamplePrecision = Annotated[Optional[str], typer.Option("--precision", help=f"{one_of(Precision)} for the network "
                                                        f"(fp16: GPUs; auto: as train picks).{default(H.precision)}")]

# -- noise ------------------------------------------------------------------------------------
Image = Annotated[Path, typer.Argument(help="An image file.", show_default=False)]
Steps = Annotated[List[int], typer.Option("--t", help="Forward steps to apply (0 = the image, T = pure noise); "
                                          "repeat for a strip.")]
NoiseOut = Annotated[Optional[Path], typer.Option("--out", help="Output PNG. \\[default: <image>_t<...>.png here]")]
NoiseImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Resize (short side) and centre-crop as "
                                                       "train does, then enlarge to be seen. \\[default: the image's "
                                                       "own size, up to --max-side]")]
MaxSide = Annotated[int, typer.Option(help="Without --image-size, shrink an image whose long side is longer to this "
                                      "many pixels (0: never), so that a photo's strip stays a PNG you can open.")]

NoiseSeed = Annotated[int, typer.Option("--seed", help="Seed of the noise ε (the same ε at every t).")]

# -- explore ----------------------------------------------------------------------------------
ExploreImage = Annotated[Optional[Path], typer.Argument(help="An image to noise and restore. \\[default: one of the "
                                                        "run's training images]", show_default=False)]
Frames = Annotated[int, typer.Option(help="Values of t the page holds (from 0 to T); more is smoother and larger.")]
ExploreOut = Annotated[Path, typer.Option("--out", help="The page to write.")]
OneClass = Annotated[Optional[str], typer.Option("--class", help="A conditional model's class to walk back into, "
                                                 "by name or index.")]
Open = Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")]

# -- interpolate ------------------------------------------------------------------------------
TwoImages = Annotated[Optional[List[Path]], typer.Argument(help="Two images to walk between (DDIM inversion).",
                                                           show_default=False)]
Seeds = Annotated[Optional[tuple[int, int]], typer.Option(help="Two seeds to walk between, instead of images.",
                                                          show_default=False)]
InterpolateFrames = Annotated[int, typer.Option("--frames", help="Frames, the two ends included.")]
InterpolateSteps = Annotated[int, typer.Option("--steps", help="DDIM steps, for the inversion and the way back.")]
InterpolateOut = Annotated[Optional[Path], typer.Option("--out", help="Folder for the frames, strip.png and strip.gif. "
                                                        "\\[default: samples/<run>-interpolate-<a>-<b>-<steps>steps]")]

# -- inspect ----------------------------------------------------------------------------------
CheckpointPath = Annotated[Path, typer.Argument(help="A .safetensors checkpoint, or a run folder (in a folder of "
                                                "runs, the newest).", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# distill
DistillRun = Annotated[Path, typer.Argument(help="The trained run (or model.safetensors) to distill.", show_default=False)]
DistillSteps = Annotated[int, typer.Option("--steps", min=1, help="Network calls a sample takes with the student.")]
TeacherSteps = Annotated[Optional[int], typer.Option(help="The teacher's DDIM steps the student learns to take "
                                                    "at once, a multiple of --steps. \\[default: 16 in each student step, at least "
                                                    "64, at most the diffusion steps]")]
DistillGuidance = Annotated[float, typer.Option("--guidance", min=0.0, help="A conditional model's guidance weight, "
                                                "distilled into the student (one network call a step).")]
DistillTrainSteps = Annotated[Optional[int], typer.Option(help="Optimizer steps of the distillation. \\[default: "
                                                          "800; with --max-time, fitted to the time]")]
DistillLr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the distillation (AdamW): "
                                                  "the student starts as the teacher, so a tenth of training's. "
                                                  "\\[default: 0.0001]", show_default=False)]
DistillWarmup = Annotated[Optional[int], typer.Option(help="Linear LR warm-up steps of the distillation. "
                                                      "\\[default: 10]", show_default=False)]
DistillOut = Annotated[Optional[Path], typer.Option("--out", help="The student's run folder. \\[default: "
                                                    "<run>-distilled-<steps>steps beside the teacher's]")]
DistillResume = Annotated[bool, typer.Option("--resume", help="Continue the distillation in --out.")]
