"""Rendered characters: a data set with a handedness, for the tests and benchmarks of mirroring (mirror.py)."""

from __future__ import annotations

import torch

GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def render_glyphs(n: int, size: int, seed: int = 0, chars: str = GLYPHS) -> torch.Tensor:
    """n images of one character each, drawn with Pillow's own font at several sizes and positions: a data set
    with a handedness (a mirrored 'R' or '7' is not a fair example). (n, 3, size, size) uint8, deterministic."""
    from PIL import Image, ImageDraw, ImageFont

    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(len(chars), (n,), generator=g).tolist()
    scale = (0.55 + 0.35 * torch.rand(n, generator=g)).tolist()
    shift = ((torch.rand(n, 2, generator=g) - 0.5) * 0.3 * size).tolist()
    ink = torch.randint(2, (n,), generator=g).tolist()  # dark on light or light on dark
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    fonts: dict[int, ImageFont.ImageFont] = {}
    for i in range(n):
        points = max(6, round(size * scale[i]))
        if points not in fonts:
            fonts[points] = ImageFont.load_default(size=points)
        fg, bg = (20, 240) if ink[i] else (240, 20)
        canvas = Image.new("L", (size, size), bg)
        ImageDraw.Draw(canvas).text((size / 2 + shift[i][0], size / 2 + shift[i][1]), chars[kinds[i]], fill=fg,
                                    font=fonts[points], anchor="mm")
        images[i] = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(1, size, size)
    return images
