"""Pictures for a person to look at: grids, labelled strips, PNGs and GIFs of uint8 images, written atomically."""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .decode import to_tensor
from ..formats.files import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """(N, C, H, W) uint8 -> one (C, H', W') uint8 image, nrow images a row (default: near square)."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 -> a PIL image."""
    arr = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB")


def save_image(im: Image.Image, path: str | os.PathLike) -> None:
    """Write a PIL image as PNG, atomically."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_png(image: torch.Tensor, path: str | os.PathLike, upscale: int = 1) -> None:
    """Write a (C, H, W) uint8 image as PNG, optionally enlarged (nearest) to be seen."""
    im = to_pil(image)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.Resampling.NEAREST)
    save_image(im, path)


def save_gif(frames: Sequence[torch.Tensor], path: str | os.PathLike, ms_per_frame: int = 80) -> None:
    """An animated GIF of (C, H, W) uint8 frames; the last frame is held longer."""
    ims = [to_pil(f).convert("RGB") for f in frames]
    durations = [ms_per_frame] * (len(ims) - 1) + [1500]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0)
    atomic_write_bytes(path, buf.getvalue())


def default_font(size: int):
    """Pillow's own font at `size` points (Pillow < 10.1 has one fixed size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def labelled_strip(panels: Sequence[torch.Tensor], labels: Sequence[str], gap: int = 8) -> torch.Tensor:
    """Images of one size side by side, left to right, each with its label above: (C, H', W') uint8."""
    from PIL import ImageDraw

    c, h, w = panels[0].shape
    font_size = max(12, min(48, w // 12))
    font = default_font(font_size)
    top = font_size + 2 * gap
    canvas = Image.new("RGB", (len(panels) * (w + gap) + gap, h + top + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = gap + i * (w + gap)
        canvas.paste(to_pil(panel).convert("RGB"), (x, top))
        draw.text((x + w / 2, gap), label, fill="black", font=font, anchor="mt")
    strip = to_tensor(canvas)
    return strip[:1] if c == 1 else strip


def grid_upscale(size: int) -> int:
    """How much to enlarge a grid of size-pixel images so that a person can see them (≥ 64 px each)."""
    return max(1, 64 // size)
