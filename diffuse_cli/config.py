"""Configuration: small frozen dataclasses that travel with the weights as JSON.

Defaults live here and nowhere else. The CLI's option names are these field names
(`--batch-size` is `TrainConfig.batch_size`; sampling's settings are in sampling.py), and a CLI
option left unset keeps the default below. Closed choices are the Literal types below, read
by the CLI's help and checked in one place (check_choice).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from .errors import ConfigError, UsageError

Schedule = Literal["linear", "cosine", "sigmoid"]
Objective = Literal["eps", "x0", "v", "edm"]  # edm: Karras et al. 2022's preconditioning (diffusion/objectives.py)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LRSchedule = Literal["constant", "cosine"]
SamplerName = Literal["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "unipc", "heun"]  # once
Spacing = Literal["trailing", "quadratic", "karras", "logsnr"]
Variance = Literal["posterior", "beta"]  # ddpm's σ_t²: β̃_t or β_t
ClassesMode = Literal["auto", "off"]
Threshold = Literal["clip", "dynamic"]


# The most diffusion steps a schedule may have: far past any published model (1,000 to 4,000), and small enough
# that a corrupt config cannot make the schedule's tensors the size of memory.
MAX_TIMESTEPS = 100_000


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: (x_t, t) -> network output, at one image size."""

    image_size: int = 32
    channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0
    # The fewest channels in a GroupNorm group. At 1 (what checkpoints from before it say), a 16- or
    # 32-channel layer gets groups of one channel, whose normalisation removes the time and class
    # embedding added just before it: `tiny` ignored t. Presets that narrow set 2 (unet.group_norm).
    norm_group_min: int = 1
    # Class names (a data folder's subfolders): a conditional model learns an embedding for each, and one
    # more, index len(class_names), for "no class" (classifier-free guidance's unconditional half). () : none.
    class_names: tuple[str, ...] = ()
    # Conventions of networks trained elsewhere (diffusers.py imports them exactly); our own models keep
    # these defaults, and checkpoints from before them load unchanged. GroupNorm's ε; the time code's
    # frequencies exp(-ln(10⁴) i / (half - time_freq_shift)) (Ho et al.'s DDPM: shift 1) and its order
    # (cos before sin); downsampling's padding (0: none, the right and bottom edges padded by one, as
    # TensorFlow's 'SAME' stride-2 convolution).
    norm_eps: float = 1e-5
    time_freq_shift: float = 0.0
    time_cos_first: bool = False
    downsample_padding: int = 1


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network is trained to predict."""

    schedule: Schedule = "cosine"
    timesteps: int = 1000
    objective: Objective = "v"


# A saved TrainConfig.steps that means "not yet fitted to --max-time": a run stopped before its fit records this
# (checkpoint format 1), and resuming it fits the steps again (training/budget.py).
UNFITTED = 2**62


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation; none of it is needed to sample."""

    batch_size: int = 32  # global: split across processes under DDP
    steps: int = 4000  # with --max-time alone: fitted to the time (budget.Budget)
    lr: float = 1e-3
    lr_schedule: LRSchedule = "cosine"
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_max_decay: float = 0.9999
    ema_power: float = 2 / 3  # EMA warm-up of Karras et al.: decay = 1 - (1 + step)^-power
    # Post-hoc EMA (training/posthoc_ema.py): the lengths σ_rel of the power-function averages whose snapshots the
    # run keeps, from which `diffuse ema` rebuilds the EMA of any length after training. (): none kept.
    posthoc_ema: tuple[float, ...] = (0.05, 0.10)
    min_snr_gamma: float = 5.0  # 0 turns min-SNR-γ weighting off
    classes: ClassesMode = "auto"  # auto: a data folder's subfolders are classes (a conditional model); off: ignore them
    # A conditional model sees "no class" instead of the label this often, so that one network also
    # predicts unconditionally: the half that classifier-free guidance pushes away from (Ho & Salimans 2022).
    class_dropout: float = 0.1
    # Mirror each training image left-right with probability 1/2 (Ho et al.'s augmentation); None: decide
    # from the data (mirror.probe_mirroring), and record the decision in the run's config.
    hflip: bool | None = None
    precision: Precision = "auto"
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    seed: int = 0

    @property
    def fitted(self) -> bool:
        """Whether the run knows its steps (False: stopped before they were fitted to its --max-time)."""
        return self.steps != UNFITTED


@dataclass(frozen=True)
class DistillConfig:
    """A student distilled from a teacher (training/distill.py): it samples in `steps` DDIM steps what the teacher
    draws in `teacher_steps`, guided by `guidance` where the model has classes (one network call a step). `teacher`:
    the teacher's model file, as a resumed distillation reads it again."""

    steps: int = 4
    teacher_steps: int = 16
    guidance: float = 1.0
    teacher: str = ""


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; saved in every checkpoint's header."""

    preset: str = "small"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None  # set for a distilled student


def validate_model(cfg: ModelConfig) -> ModelConfig:
    """Check that the U-Net can be built at this image size; return cfg unchanged."""
    levels = len(cfg.channel_mult)
    factor = 2 ** (levels - 1)
    if cfg.image_size < 4 or cfg.image_size % factor or cfg.image_size // factor < 2:
        sizes = ", ".join(str(factor * k) for k in (2, 4, 8, 16, 32) if factor * k >= 4)
        raise ConfigError(
            f"image size {cfg.image_size} cannot be halved {_times(levels - 1)} by this U-Net; "
            f"use a multiple of {factor} of at least {2 * factor} (e.g. {sizes})")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), not {cfg.channels}")
    for name in ("base_channels", "num_res_blocks", "head_channels", "norm_group_min"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), not {cfg.dropout}")
    if len(set(cfg.class_names)) != len(cfg.class_names) or not all(isinstance(c, str) and c for c in cfg.class_names):
        raise ConfigError(f"class names must be distinct and not empty, not {list(cfg.class_names)}")
    return cfg


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def validate_diffusion(cfg: DiffusionConfig) -> DiffusionConfig:
    """Check the forward process's settings; return cfg unchanged."""
    if not 2 <= cfg.timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"timesteps must be from 2 to {MAX_TIMESTEPS:,}, not {cfg.timesteps}")
    return cfg


def validate_train(cfg: TrainConfig) -> TrainConfig:
    """Check the optimisation settings; return cfg unchanged."""
    for f in fields(cfg):  # nan passes every comparison below, and an infinite rate trains nothing
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name.replace('_', '-')} must be a finite number, not {value}")
    for name in ("batch_size", "steps", "grad_accum", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, not {cfg.lr}")
    if cfg.warmup < 0 or cfg.grad_clip < 0 or cfg.min_snr_gamma < 0:
        raise ConfigError("warmup, grad-clip and min-snr-gamma must not be negative")
    if not 0 <= cfg.ema_max_decay < 1:
        raise ConfigError(f"ema-max-decay must be in [0, 1), not {cfg.ema_max_decay}")
    if not 0 <= cfg.class_dropout < 1:
        raise ConfigError(f"class-dropout must be in [0, 1), not {cfg.class_dropout}")
    if not all(0 < s < (1 / 12) ** 0.5 for s in cfg.posthoc_ema) or len(set(cfg.posthoc_ema)) != len(cfg.posthoc_ema):
        raise ConfigError(f"posthoc-ema lengths must be distinct and between 0 and 0.288, not {list(cfg.posthoc_ema)}")
    return cfg


def split_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fields by name -> those of ModelConfig, DiffusionConfig and TrainConfig; an unknown name is an error."""
    parts: tuple[dict[str, Any], ...] = ({}, {}, {})
    owners = [{f.name for f in dataclasses.fields(cls)} for cls in (ModelConfig, DiffusionConfig, TrainConfig)]
    for name, value in fields.items():
        owner = next((i for i, names in enumerate(owners) if name in names), None)
        if owner is None:
            known = ", ".join(sorted(set().union(*owners)))
            raise ConfigError(f"unknown setting {name!r}; the settings are: {known}")
        parts[owner][name] = value
    return parts  # type: ignore[return-value]


def require_positive(**settings: int | None) -> None:
    """Refuse the first setting below 1 (None: not given): require_positive(save_every=0) -> 'save_every must be
    at least 1, not 0' (the CLI says '--save-every')."""
    for name, value in settings.items():
        if value is not None and value < 1:
            raise UsageError(f"{{{name}}} must be at least 1, not {value}", name)


SEED_MAX = 2**32 - 1  # numpy's range, which other tools' seeds keep to; torch's generators take any of these


def check_seed(seed: int, name: str = "seed") -> int:
    """Refuse a seed outside 0 .. SEED_MAX (torch overflows far beyond it, and only after a run folder is made);
    return it."""
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{{{name}}} must be from 0 to {SEED_MAX:,}, not {seed}", name)
    return seed


def check_guidance(guidance: float) -> float:
    """Refuse a classifier-free guidance weight below 0 or not finite (nan and inf draw images of nan); return it."""
    if not 0 <= guidance < math.inf:
        raise UsageError(f"{{guidance}} must be at least 0, and finite, not {guidance}", "guidance")
    return guidance


def check_steps(steps: int, timesteps: int) -> int:
    """Refuse a sampler's step count outside 1 .. a model's diffusion steps; return it."""
    require_positive(steps=steps)
    if steps > timesteps:
        raise UsageError(f"{{steps}} {steps} is more than the model's {timesteps} diffusion steps", "steps")
    return steps


def check_choice(value: Any, literal: Any, name: str) -> Any:
    """Return value if it is one of the Literal's choices, else raise ConfigError."""
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, allowed))}")
    return value


# The closed choices of the settings, by field name: what make_config checks before building.
CHOICES = {"schedule": Schedule, "objective": Objective, "precision": Precision, "lr_schedule": LRSchedule,
           "classes": ClassesMode}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able data. A Config that is not distilled says nothing of distillation, so that its
    header and export are what they were before there was any (and older versions of diffuse read them)."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, Config) and cfg.distill is None:
        del data["distill"]
    return data


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from to_dict's output; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))} "
                          "(written by a newer diffuse?)")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if value is not None and not dataclasses.is_dataclass(hint):  # X | None: the dataclass X, where it is one
            hint = next((arm for arm in get_args(hint) if dataclasses.is_dataclass(arm)), hint)
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif getattr(hint, "__origin__", None) is tuple:
            value = tuple(value)
        elif getattr(hint, "__origin__", None) is Literal:
            value = check_choice(value, hint, name)
        kwargs[name] = value
    return cls(**kwargs)


def config_to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> Config:
    return from_dict(Config, json.loads(text))
