"""Shared by the benchmarks: a feature-space distance between image sets, and timing helpers.

No pretrained network can be downloaded here, so the features come from a fixed, randomly
initialised convolutional network (seeded, identical on every machine): multi-scale
average-pooled activations, 448 numbers an image. The Fréchet distance between the Gaussian
fits of two sets of features ("random-feature FD") is 0 for identical sets, small for two draws
of the same data and large for noise; `python benchmarks/common.py` prints those anchors.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class RandomFeatures(nn.Module):
    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = [channels, 64, 128, 256]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        for conv in self.convs:
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, 448) features."""
        h, feats = images.float() / 127.5 - 1, []
        for conv in self.convs:
            h = torch.relu(conv(h))
            feats.append(h.mean((2, 3)))
            h = nn.functional.avg_pool2d(h, 2) if h.shape[-1] >= 4 else h
        return torch.cat(feats, 1).double()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||μ_a - μ_b||² + Tr(Σ_a + Σ_b - 2 (Σ_a^½ Σ_b Σ_a^½)^½) between two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(ca)
    cross = _sqrtm_psd(root_a @ cb @ root_a)
    return ((mu_a - mu_b).square().sum() + torch.trace(ca + cb - 2 * cross)).item()


def image_fd(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    net = RandomFeatures(images_a.shape[1])
    feats = lambda x: torch.cat([net(chunk) for chunk in x.split(256)])  # noqa: E731
    return frechet_distance(feats(images_a), feats(images_b))


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    from diffuse_cli.shapes import render_shapes

    train = render_shapes(2000, 32, seed=0)
    held_out = render_shapes(2000, 32, seed=1)
    noise = torch.randint(0, 256, train.shape, dtype=torch.uint8)
    blurred = nn.functional.avg_pool2d(held_out.float(), 3, 1, 1).round().to(torch.uint8)
    print("random-feature FD to the built-in training set (2000 images each):")
    print(f"  held-out built-in images : {image_fd(train, held_out):8.3f}")
    print(f"  the same, 3x3 blurred    : {image_fd(train, blurred):8.3f}")
    print(f"  uniform noise            : {image_fd(train, noise):8.3f}")
