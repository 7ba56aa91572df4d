"""GroupNorm over a channels_last image in two passes (numba), forward and backward.

torch's CPU GroupNorm on channels_last memory splits its work by (image, group) below 1,024 positions, so each
thread reads a group's few channels at a stride of all of them: at 16x16 and 8x8 it took 4-8x the time of the same
norm on contiguous memory (docs/speed.md). Here each image's channels are summed along its positions with the
channels innermost (SIMD over the contiguous NHWC rows), the group statistics taken from those sums, and the
normalised, scaled and shifted image written in a second pass. The backward sums dz and dz·x per channel in one
pass and writes dx in a second. (A SiLU fused in would cost more than its own pass: numba's exp does not run in
SIMD without Intel's SVML, so fast_ops.group_norm leaves it to torch.)

Tensors are float32, laid out (N, P, C): an image's P = H·W positions of C channels each (a channels_last image's
permute(0, 2, 3, 1)). Sums are taken in float64, so the variance E[x²] − E[x]² keeps float32's precision. Work is
split over the images. tests/test_fast_ops.py holds both passes to F.group_norm.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

OPTIONS = dict(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)


@njit(**OPTIONS)
def forward(x, weight, bias, groups, eps, y, mean, rstd):
    """y = GroupNorm(x): x, y (N, P, C); weight, bias (C,); each group's mean and 1/std written to mean, rstd (N, G)."""
    n_images, positions, channels = x.shape
    per_group = channels // groups
    count = positions * per_group
    for n in prange(n_images):
        s1 = np.zeros(channels, dtype=np.float64)
        s2 = np.zeros(channels, dtype=np.float64)
        for p in range(positions):
            for c in range(channels):
                v = np.float64(x[n, p, c])
                s1[c] += v
                s2[c] += v * v
        scale = np.empty(channels, dtype=np.float32)
        shift = np.empty(channels, dtype=np.float32)
        for g in range(groups):
            total, squares = 0.0, 0.0
            for c in range(g * per_group, (g + 1) * per_group):
                total += s1[c]
                squares += s2[c]
            mu = total / count
            r = 1.0 / np.sqrt(max(squares / count - mu * mu, 0.0) + eps)
            mean[n, g], rstd[n, g] = mu, r
            for c in range(g * per_group, (g + 1) * per_group):
                scale[c] = weight[c] * r
                shift[c] = bias[c] - mu * weight[c] * r
        for p in range(positions):
            for c in range(channels):
                y[n, p, c] = x[n, p, c] * scale[c] + shift[c]


@njit(**OPTIONS)
def backward(dz, x, weight, mean, rstd, dx, dweight, dbias):
    """dx (N, P, C), and each image's share of dweight and dbias (N, C), from dz, the gradient at the norm's output."""
    n_images, positions, channels = x.shape
    groups = mean.shape[1]
    per_group = channels // groups
    count = positions * per_group
    for n in prange(n_images):
        a = np.zeros(channels, dtype=np.float64)  # Σ_p dz
        b = np.zeros(channels, dtype=np.float64)  # Σ_p dz·x
        for p in range(positions):
            for c in range(channels):
                g = np.float64(dz[n, p, c])
                a[c] += g
                b[c] += g * x[n, p, c]
        coef_dz = np.empty(channels, dtype=np.float32)
        coef_x = np.empty(channels, dtype=np.float32)
        coef_1 = np.empty(channels, dtype=np.float32)
        for g in range(groups):
            mu, r = np.float64(mean[n, g]), np.float64(rstd[n, g])
            m1, m2 = 0.0, 0.0  # the group's means of dx̂ and of dx̂·x̂, x̂ = (x − μ)·r and dx̂ = dz·weight
            for c in range(g * per_group, (g + 1) * per_group):
                m1 += weight[c] * a[c]
                m2 += weight[c] * (b[c] - mu * a[c]) * r
                dweight[n, c] = (b[c] - mu * a[c]) * r
                dbias[n, c] = a[c]
            m1, m2 = m1 / count, m2 / count
            for c in range(g * per_group, (g + 1) * per_group):  # dx = r·(dx̂ − m1 − x̂·m2)
                coef_dz[c] = r * weight[c]
                coef_x[c] = -r * r * m2
                coef_1[c] = -r * m1 + mu * r * r * m2
        for p in range(positions):
            for c in range(channels):
                dx[n, p, c] = dz[n, p, c] * coef_dz[c] + x[n, p, c] * coef_x[c] + coef_1[c]
