"""How a run went, as a picture: loss (raw and smoothed, log scale) and learning rate against step.

Drawn with Pillow alone (no plotting library to install): two stacked panels sharing the step axis.
"""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..images.pictures import default_font

WIDTH, PANEL, MARGIN = 720, 230, (70, 16, 24, 36)  # margins: left, right, top, bottom (pixels)
RAW, SMOOTH, LR, GRID, INK = (170, 190, 220), (25, 70, 160), (210, 110, 20), (228, 228, 228), (40, 40, 40)


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average that skips NaN (a stretch of skipped steps) and starts on the first value."""
    out, current = [], math.nan
    for v in values:
        if math.isfinite(v):
            current = v if math.isnan(current) else weight * current + (1 - weight) * v
        out.append(current)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values between 10^lo and 10^hi for a log axis: powers of ten, or within a decade or two, 1-2-5 steps
    (every digit when even those are too few)."""
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas
                 if lo <= math.log10(m * 10.0 ** k) <= hi]
        if len(ticks) >= 3:
            return ticks
    return ticks


def label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10_000 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:g}"


def _panel(draw: ImageDraw.ImageDraw, top: int, steps: list[float], series: list[tuple[list[float], tuple]],
           title: str, log: bool, font: ImageFont.ImageFont, span: tuple[float, float] | None = None) -> None:
    """One panel: its frame, grid, ticks and lines; `log` plots the values on a log10 scale; `span`: the step
    axis's ends (default: the steps')."""
    left, right, pad_top, pad_bottom = MARGIN
    x0, x1, y0, y1 = left, WIDTH - right, top + pad_top, top + PANEL - pad_bottom
    values = [v for ys, _ in series for v in ys if math.isfinite(v) and (v > 0 or not log)]
    if not values:
        return
    f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
    lo, hi = f(min(values)), f(max(values))
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    s_lo, s_hi = span or (min(steps), max(steps))
    s_hi = max(s_hi, s_lo + 1)
    px = lambda s: x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0)  # noqa: E731
    py = lambda v: y1 - (f(v) - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
    ticks = log_ticks(lo, hi) if log else nice_ticks(lo, hi)
    for v in ticks:
        if lo <= f(v) <= hi:
            draw.line([(x0, py(v)), (x1, py(v))], fill=GRID)
            draw.text((x0 - 6, py(v)), label(float(f"{v:.3g}")), fill=INK, font=font, anchor="rm")
    for s in nice_ticks(s_lo, s_hi):
        draw.line([(px(s), y1), (px(s), y1 + 4)], fill=INK)
        draw.text((px(s), y1 + 6), label(s), fill=INK, font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text((x0, top + 4), title, fill=INK, font=font)
    for ys, colour in series:
        points = [(px(s), py(v)) for s, v in zip(steps, ys) if math.isfinite(v) and (v > 0 or not log)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 if colour != RAW else 1)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)


def loss_plot(records: Sequence[dict]) -> Image.Image:
    """Loss (raw and smoothed, log scale) above learning rate, against step, from training's log records; and
    below them FID, where the run measured it (train --eval-every)."""
    font = default_font(12)
    fids = [r for r in records if "fid" in r]
    records = [r for r in records if "loss" in r]
    panels = 3 if fids else 2
    every = [float(r["step"]) for r in records + fids]
    span = (min(every), max(every)) if every else None
    image = Image.new("RGB", (WIDTH, panels * PANEL), "white")
    draw = ImageDraw.Draw(image)
    steps = [float(r["step"]) for r in records]
    loss = [float(r["loss"]) for r in records]
    _panel(draw, 0, steps, [(loss, RAW), (smoothed(loss), SMOOTH)], "loss (light: every 10 steps; dark: smoothed)",
           log=True, font=font, span=span)
    _panel(draw, PANEL, steps, [([float(r["lr"]) for r in records], LR)], "learning rate", log=False, font=font,
           span=span)
    if fids:
        _panel(draw, 2 * PANEL, [float(r["step"]) for r in fids], [([float(r["fid"]) for r in fids], SMOOTH)],
               f"FID of {fids[-1].get('fid_samples', '?')} samples (lower is better)", log=True, font=font, span=span)
    draw.text((WIDTH - MARGIN[1], panels * PANEL - 4), "step", fill=INK, font=font, anchor="rb")
    return image
