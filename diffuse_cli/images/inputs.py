"""The images an edit starts from and its mask, read from files or tensors as training reads its images."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .data import find_files
from .decode import TooLarge, is_grayscale, open_image, resize_crop, to_tensor
from ..errors import DataError, UsageError

PathLike = str | os.PathLike


@dataclass
class EditInputs:
    """Init images as uint8 (N, C, S, S) at the model's size, each one's name, and where to generate:
    bool (N, 1, S, S), True = generate (None: no mask, the whole image is edited)."""

    images: torch.Tensor
    names: list[str]
    generate: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)  # lines to show the user: files skipped, a mask resized

    def generated_share(self) -> float:
        return 1.0 if self.generate is None else self.generate.float().mean().item()


def read_edit(init: PathLike | torch.Tensor, mask: PathLike | torch.Tensor | None, size: int,
              channels: int, strict: bool = True) -> EditInputs:
    """An init (a file, a folder of them, or uint8 (C, S, S) / (N, C, S, S)) and a mask (a file, or a
    (S, S) / (N, 1, S, S) tensor, True or >= 128 where to generate), for a model of this size and channels.
    strict=False reads a grayscale file for a colour model as gray RGB, as training does (the explorer)."""
    if isinstance(init, torch.Tensor):
        images = init[None] if init.ndim == 3 else init
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size) or images.dtype != torch.uint8:
            raise DataError(f"the init is {tuple(init.shape)} {init.dtype}; this model takes uint8 ({channels}, "
                            f"{size}, {size}) images")
        inputs, own = EditInputs(images.cpu(), [f"init{i}" for i in range(len(images))]), None
    else:
        inputs, own = _read_inits(Path(init), size, channels, strict)
    if mask is not None:
        inputs.generate = _mask_tensor(mask, len(inputs.images), size) if isinstance(mask, torch.Tensor) \
            else _read_mask(Path(mask), own, size, inputs.notes)
        empty = ~inputs.generate.flatten(1).any(1)  # per init: nothing white inside its crop
        if empty.any():
            which = "" if len(inputs.images) == 1 else f" within {inputs.names[int(empty.nonzero()[0])]}"
            raise DataError(f"the mask has nothing to generate{which}: it is black (keep) everywhere in the "
                            f"{size}x{size} crop the model sees; paint white where new pixels should go")
    return inputs


def _read_inits(path: Path, size: int, channels: int, strict: bool) -> tuple[EditInputs, list[tuple[int, int]]]:
    """A file, or every readable image in a folder (the rest skipped, and said): the images, and each one's
    own (width, height). A colour file for a grayscale model is refused; `strict`: a grayscale file (one
    channel stored) for a colour model too, as an init of another channel count."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = find_files(path) if path.is_dir() else [path]
    images, names, own, skipped = [], [], [], []
    for file in files:
        try:
            im = open_image(file, 3)
        except TooLarge as e:
            skipped.append(f"{file.name} (too large: {e})")
            continue
        except Exception as e:  # any decoder failure is the user's file, not our bug
            skipped.append(f"{file.name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        rgb = to_tensor(resize_crop(im, size))
        if channels == 1 and not is_grayscale(rgb):
            raise DataError(f"{file} is in colour, and this model is grayscale (1 channel): give a grayscale image")
        if strict and channels == 3 and _stored_gray(file):
            raise DataError(f"{file} is a grayscale image (1 channel), and this model draws in colour (3 channels): "
                            "save it as RGB to edit it with this model")
        images.append(rgb[:1] if channels == 1 else rgb)
        names.append(file.stem)
        own.append(im.size)
    if not images:
        if not path.is_dir():
            raise DataError(f"{path}: cannot read as an image ({skipped[0].split(' (', 1)[1].rstrip(')')})")
        raise DataError(f"{path}: no readable image in the folder" + (f" ({skipped[0]})" if skipped else ""))
    notes = [f"warning: skipped {len(skipped)} of {len(files)} files that are not readable images: "
             f"{', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}"] if skipped else []
    return EditInputs(torch.stack(images), names, notes=notes), own


def _stored_gray(path: Path) -> bool:
    """Whether a file stores one gray channel (L, LA, 1-bit, 16-bit or float gray; a palette of grays)."""
    with Image.open(path) as im:
        if im.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"):
            return True
        return im.mode in ("P", "PA") and is_grayscale(to_tensor(im.convert("RGB")))


def _read_mask(path: Path, own: list[tuple[int, int]] | None, size: int, notes: list[str]) -> torch.Tensor:
    """The mask resized to each init's own size (said, when it differs), then cropped as the init is:
    bool (N, 1, S, S), True where it is white (>= 128)."""
    if path.is_dir():
        raise DataError(f"{{mask}} {path} is a folder; give one image file (white: generate, black: keep)", "mask")
    if not path.is_file():
        raise DataError(f"{{mask}} {path}: no such file", "mask")
    try:
        im = open_image(path, 1)
    except Exception as e:  # any decoder failure is the user's file, not our bug
        raise DataError(f"{{mask}} {path}: cannot read as an image ({str(e).splitlines()[0] or type(e).__name__})",
                        "mask") from None
    sizes = own or [(size, size)]
    if other := sorted({s for s in sizes if s != im.size}):
        shown = ", ".join(f"{w}x{h}" for w, h in other[:3]) + (" ..." if len(other) > 3 else "")
        notes.append(f"note: the mask is {im.width}x{im.height} and the init {shown}: the mask is resized to match")
    masks = [to_tensor(resize_crop(im.resize(s, Image.Resampling.BILINEAR) if s != im.size else im, size,
                                   Image.Resampling.BILINEAR)) >= 128 for s in sizes]
    return torch.stack(masks) if own else masks[0][None]


def _mask_tensor(mask: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """A mask tensor as bool (n, 1, S, S): True, or >= 128 for uint8, where to generate."""
    m = mask >= 128 if mask.dtype == torch.uint8 else mask.bool()
    m = m.reshape(-1, 1, *m.shape[-2:]) if m.ndim >= 2 else m
    if m.ndim != 4 or tuple(m.shape[-2:]) != (size, size) or len(m) not in (1, n):
        raise UsageError(f"the mask is {tuple(mask.shape)}; give ({size}, {size}) or ({n}, 1, {size}, {size})")
    return m.expand(n, 1, size, size).cpu()
