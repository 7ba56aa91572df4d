"""GroupNorm over a channels_last image in two passes (numba), forward and backward.

torch's CPU GroupNorm on channels_last memory splits its work by (image, group) below 1,024 positions, so each
thread reads a group's few channels at a stride of all of them: at 16x16 and 8x8 it took 4-8x the time of the same
norm on contiguous memory (docs/speed.md). Here each image's channels are summed along its positions with the
channels innermost (SIMD over the contiguous NHWC rows), the group statistics taken from those sums, and the
normalised, scaled and shifted image written in a second pass, with the SiLU after it where asked. The backward
sums dz and dz·x per channel in one pass and writes dx in a second.

numba's `exp` runs one element at a time without Intel's SVML, so the SiLU's exp is written out (`silu`): Cephes'
expf, a degree-7 polynomial on [−ln2/2, ln2/2] times 2^k, the power of two made from its exponent bits, which the
compiler vectorises with the rest of the pass.

Tensors are float32, laid out (N, P, C): an image's P = H·W positions of C channels each (a channels_last image's
permute(0, 2, 3, 1)). Sums are taken in float64, so the variance E[x²] − E[x]² keeps float32's precision. Work is
split over the images. tests/test_fast_ops.py holds both passes to F.group_norm.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

OPTIONS = dict(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)

# Cephes expf: exp(u) = 2^k · exp(r), k = round(u / ln2), r = u − k·ln2 (ln2 in two parts, so r is exact), and
# exp(r) = 1 + r + r²·P(r); float32 constants, so nothing is promoted to float64
LOG2E, LN2_HI, LN2_LO = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_P = tuple(np.float32(p) for p in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                      1.6666665459e-1, 5.0000001201e-1))
EXP_MIN, EXP_MAX = np.float32(-87.0), np.float32(88.0)  # exp stays a normal float32 between them
ONE, HALF = np.float32(1.0), np.float32(0.5)


@intrinsic
def _int32_bits_as_float32(typingctx, i):
    """The float32 whose bits are the int32 i (a reinterpretation, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=True)
def _one_plus_exp_neg(z):
    """1 + exp(−z) in float32 (exp clamped to float32's normal range)."""
    u = min(max(-z, EXP_MIN), EXP_MAX)
    k = np.floor(u * LOG2E + HALF)
    r = u - k * LN2_HI - k * LN2_LO
    p = EXP_P[0]
    for coefficient in EXP_P[1:]:
        p = p * r + coefficient
    power = _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # 2^k, as the exponent's bits
    return ONE + (p * r * r + r + ONE) * power


@njit(inline="always", fastmath=True)
def silu(z):
    """z·σ(z) = z / (1 + exp(−z)) in float32, within a few units in the last place of torch's F.silu."""
    return z / _one_plus_exp_neg(z)


@njit(inline="always", fastmath=True)
def silu_slope(z):
    """d(z·σ(z))/dz = σ(z)·(1 + z·(1 − σ(z))), the SiLU's gradient, in float32."""
    sigma = ONE / _one_plus_exp_neg(z)
    return sigma * (ONE + z * (ONE - sigma))


@njit(**OPTIONS)
def forward(x, weight, bias, groups, eps, y, mean, rstd, with_silu):
    """y = GroupNorm(x), then SiLU(y) where with_silu: x, y (N, P, C); weight, bias (C,); each group's mean and 1/std
    written to mean, rstd (N, G)."""
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
        if with_silu:
            for p in range(positions):
                for c in range(channels):
                    y[n, p, c] = silu(x[n, p, c] * scale[c] + shift[c])
        else:
            for p in range(positions):
                for c in range(channels):
                    y[n, p, c] = x[n, p, c] * scale[c] + shift[c]


@njit(**OPTIONS)
def backward(dz, x, weight, bias, mean, rstd, dx, dweight, dbias, with_silu):
    """dx (N, P, C), and each image's share of dweight and dbias (N, C), from dz, the gradient at the norm's output,
    or where with_silu at the SiLU's after it: then the norm's output is made again from x and the SiLU's gradient
    taken in the first pass, its product with dz kept in dx until the second pass overwrites it."""
    n_images, positions, channels = x.shape
    groups = mean.shape[1]
    per_group = channels // groups
    count = positions * per_group
    for n in prange(n_images):
        a = np.zeros(channels, dtype=np.float64)  # Σ_p dz
        b = np.zeros(channels, dtype=np.float64)  # Σ_p dz·x
        grad = dz[n]  # this image's gradient at the norm's output
        if with_silu:
            scale = np.empty(channels, dtype=np.float32)
            shift = np.empty(channels, dtype=np.float32)
            for c in range(channels):
                scale[c] = weight[c] * rstd[n, c // per_group]
                shift[c] = bias[c] - mean[n, c // per_group] * scale[c]
            for p in range(positions):  # a row's SiLU gradient first, in float32 alone, where it vectorises
                for c in range(channels):
                    dx[n, p, c] = dz[n, p, c] * silu_slope(x[n, p, c] * scale[c] + shift[c])
                for c in range(channels):
                    d = np.float64(dx[n, p, c])
                    a[c] += d
                    b[c] += d * x[n, p, c]
            grad = dx[n]
        else:
            for p in range(positions):
                for c in range(channels):
                    d = np.float64(grad[p, c])
                    a[c] += d
                    b[c] += d * x[n, p, c]
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
                dx[n, p, c] = grad[p, c] * coef_dz[c] + x[n, p, c] * coef_x[c] + coef_1[c]
