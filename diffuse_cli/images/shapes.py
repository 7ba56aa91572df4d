"""The built-in dataset: upright coloured circles, triangles, squares and crosses on plain grounds.

Drawn procedurally (anti-aliased signed distance fields), so it needs no download, is the same
on every machine for a given seed, and a person can tell at a glance whether samples are right.
"""

from __future__ import annotations

import math

import torch

SHAPES = ("circle", "triangle", "square", "cross")

# Bright shape colours on dark or light grounds, so every image has a clear figure.
FOREGROUND = torch.tensor([
    [230, 57, 70], [244, 162, 97], [233, 196, 106], [42, 157, 143],
    [69, 123, 157], [131, 56, 236], [255, 0, 110], [140, 200, 60],
], dtype=torch.float32)
BACKGROUND = torch.tensor([
    [20, 24, 36], [236, 236, 228], [60, 60, 64], [24, 40, 80],
], dtype=torch.float32)


def _polygon_sdf(q: torch.Tensor, sides: int, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance to a regular polygon of the given inradius, centred at 0, standing on a flat base: one edge's
    normal points down (+y, rows grow downwards), so a triangle points up and a square is not a diamond."""
    angles = 2 * torch.arange(sides) * math.pi / sides + math.pi / 2
    normals = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (sides, 2)
    return (q[..., None, :] * normals).sum(-1).amax(-1) - radius


def _cross_sdf(q: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (an upper bound outside) to a plus sign of arm length `radius`."""
    a, b = q[..., 0].abs(), q[..., 1].abs()
    w = radius * 0.38
    return torch.minimum(torch.maximum(a - radius, b - w), torch.maximum(a - w, b - radius))


def shape_kinds(n: int, seed: int = 0) -> torch.Tensor:
    """Which shape (an index into SHAPES) each image of render_shapes(n, size, seed) holds: its classes."""
    return torch.randint(len(SHAPES), (n,), generator=torch.Generator().manual_seed(seed))


def render_shapes(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n images of one shape each, (n, 3, size, size) uint8, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    kind = torch.randint(len(SHAPES), (n,), generator=g)  # first, as shape_kinds draws it
    radius = 0.55 + 0.15 * u(n)                       # in units of half the image
    centre = (u(n, 2) * 2 - 1) * 0.06                 # in the middle: the shape is the subject
    angle = (u(n) - 0.5) * 0.3                        # upright, give or take 9 degrees
    fg = FOREGROUND[torch.randint(len(FOREGROUND), (n,), generator=g)]
    bg = BACKGROUND[torch.randint(len(BACKGROUND), (n,), generator=g)]

    coords = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    p = torch.stack([xx, yy], dim=-1)[None] - centre[:, None, None]  # (n, H, W, 2)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    q = torch.stack([cos * p[..., 0] + sin * p[..., 1], -sin * p[..., 0] + cos * p[..., 1]], dim=-1)
    r = radius[:, None, None]

    sdf = torch.empty(n, size, size)
    masks = [kind == k for k in range(len(SHAPES))]
    sdf[masks[0]] = q[masks[0]].norm(dim=-1) - r[masks[0]]
    sdf[masks[1]] = _polygon_sdf(q[masks[1]], 3, r[masks[1]] * 0.6)
    sdf[masks[2]] = _polygon_sdf(q[masks[2]], 4, r[masks[2]] * 0.8)
    sdf[masks[3]] = _cross_sdf(q[masks[3]], r[masks[3]])

    pixel = 2 / size
    alpha = (0.5 - sdf / pixel).clamp(0, 1)[:, None]  # one-pixel anti-aliased edge
    image = alpha * fg[:, :, None, None] + (1 - alpha) * bg[:, :, None, None]
    return image.round().clamp(0, 255).to(torch.uint8)
