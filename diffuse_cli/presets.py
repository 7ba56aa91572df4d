"""Named U-Net sizes (presets) and the shape an image size gives them, after the published recipes; and a new
run's Config from a preset and settings by name. (No torch here: the CLI's help reads the presets.)"""

from __future__ import annotations

from typing import Any

from .config import (CHOICES, Config, DiffusionConfig, ModelConfig, TrainConfig, check_choice, check_seed, split_fields,
                     validate_diffusion, validate_model, validate_train)
from .errors import ConfigError

# The built-in shapes' default resolution: small enough that a few CPU-minutes of the `small` preset draw
# recognisable shapes, where at 32x32 it still draws blobs (docs/training.md).
BUILTIN_IMAGE_SIZE = 16


# Named U-Net sizes: a width (base_channels, head_channels) and a depth (num_res_blocks). The image size decides
# the rest (network_shape): how many levels, their channel multipliers and where attention sits, after the
# published recipes. `ddpm-cifar10` is the network of Ho et al. 2020 (35.7M parameters) with its own fixed shape,
# as are checkpoints saved before the shapes scaled: a checkpoint's config holds its shape, which is never derived
# again. `attend_up_to`: attention at the levels of at most this side below the top one.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_channels=16, num_res_blocks=1, head_channels=16, norm_group_min=2, attend_up_to=16),
    "small": dict(base_channels=48, num_res_blocks=1, head_channels=48, attend_up_to=16),
    "base": dict(base_channels=96, num_res_blocks=2, head_channels=64, dropout=0.1, attend_up_to=32),
    "large": dict(base_channels=128, num_res_blocks=2, head_channels=64, dropout=0.1, attend_up_to=32),
    "ddpm-cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), head_channels=256, dropout=0.1),  # one head, as in the paper
}

# Channel multipliers by the number of levels. Where the image size reaches them:
#   levels  multipliers          image size (deepest level)  from
#   3       (1, 2, 2)            16 (4x4), 32 (8x8)          ours: DDPM's first three levels; measured on the
#                                                            built-in shapes at 16 px (docs/training.md)
#   4       (1, 2, 3, 4)         64 (8x8)                    Dhariwal & Nichol 2021 (ADM), 64x64 ImageNet
#   5       (1, 1, 2, 3, 4)      128 (8x8)                   ADM, 128x128
#   6       (1, 1, 2, 2, 4, 4)   256 (8x8)                   Ho et al. 2020 (DDPM), LSUN and CelebA-HQ 256; ADM 256
#   7+      ones, then the 256 row                           ours: another full-width level on top
# Attention (attend_up_to): at 16x16 and 8x8 for tiny and small, as Nichol & Dhariwal 2021 (improved DDPM) on
# CIFAR-10; at 32x32, 16x16 and 8x8 for base and large, as ADM. Never at the full-resolution level (no recipe
# attends there: a 16-px image keeps its attention at 8x8) nor at 4x4 (none does); the middle block always attends.
CHANNEL_MULT = {1: (1,), 2: (1, 2), 3: (1, 2, 2), 4: (1, 2, 3, 4), 5: (1, 1, 2, 3, 4), 6: (1, 1, 2, 2, 4, 4)}


def levels(image_size: int) -> list[int]:
    """The side of each level of a scaled preset: halve while the side is above 8x8 (or there are fewer than three
    levels), while halving gives a whole side of at least 4. 16 -> [16, 8, 4]; 64 -> [64, 32, 16, 8]."""
    if image_size < 4:
        raise ConfigError(f"image size {image_size} is too small; use at least 4")
    sides = [image_size]
    while (sides[-1] > 8 or len(sides) < 3) and sides[-1] % 2 == 0 and sides[-1] // 2 >= 4:
        sides.append(sides[-1] // 2)
    if sides[-1] > 8:
        below, above = _working_sizes(image_size)
        raise ConfigError(f"image size {image_size} cannot be halved down to between 4x4 and 8x8 "
                          f"({' -> '.join(map(str, sides))}); use {below} or {above}, or any size 4 to 8 times a "
                          "power of two (16, 24, 32, 48, 64, 96, 128, 192, 256)")
    return sides


def _working_sizes(size: int) -> tuple[int, int]:
    """The nearest image sizes below and above `size` that halve down to 4x4-8x8."""
    works = lambda n: n >= 4 and n // (n & -n) <= 8 or n <= 8  # noqa: E731 (odd part at most 8)
    below = next(n for n in range(size, 3, -1) if works(n))
    above = next(n for n in range(size, 2 * size + 9) if works(n))
    return below, above


def network_shape(preset: str, image_size: int) -> dict[str, Any]:
    """A scaled preset's channel multipliers and attention resolutions at this image size (see CHANNEL_MULT)."""
    sides = levels(image_size)
    mult = CHANNEL_MULT.get(len(sides)) or (1,) * (len(sides) - 6) + CHANNEL_MULT[6]
    attend = PRESETS[preset]["attend_up_to"]
    return dict(channel_mult=mult, attention_resolutions=tuple(s for s in sides[1:] if 4 < s <= attend))


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset at its image size (overrides["image_size"], else ModelConfig's), shaped
    for that size unless the preset is fixed (ddpm-cifar10), with any other overrides applied last."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    if fields.pop("attend_up_to", None) is not None:
        fields.update(network_shape(preset, overrides.get("image_size", ModelConfig.image_size)))
    return validate_model(ModelConfig(**{**fields, **overrides}))


def make_config(preset: str | None = None, builtin: bool = False, **fields: Any) -> Config:
    """A new run's Config: a preset with any field of ModelConfig, DiffusionConfig or TrainConfig given by
    name (image_size=64, objective="eps", lr=2e-4); image_size defaults to BUILTIN_IMAGE_SIZE for the
    built-in shapes. Every value is checked."""
    model, diffusion, train = split_fields(fields)
    check_seed(train.get("seed", 0))  # a new run's only: a run that began with another seed still resumes
    preset = preset or Config.preset
    for name, literal in CHOICES.items():
        if name in fields:
            check_choice(fields[name], literal, name.replace("_", "-"))
    size = BUILTIN_IMAGE_SIZE if builtin else ModelConfig.image_size
    return Config(preset=preset, model=model_config(preset, **{"image_size": size, **model}),
                  diffusion=validate_diffusion(DiffusionConfig(**diffusion)), train=validate_train(TrainConfig(**train)))
