"""The diffusion's data space: an image's 8-bit pixels as floats in [-1, 1], where x_0 lives, and back."""

from __future__ import annotations

import torch


def to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clipping."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
