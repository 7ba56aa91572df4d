"""winograd.py's four tile transforms and the filters', each one pass over memory (numba), where torch's matrix
products take four.

In torch operators the transforms of F(4x4, 3x3) are a padding copy, a gathering copy of the 6x6 tiles and two
products with the 1-D matrix, each a pass over 2.25x the layer's input; a product with a 6x6 matrix does no more
than a few additions an element, so each pass runs at the speed of memory, and together they took a third of
Winograd's time on a 2-core AVX2 CPU (docs/speed.md). Here each transform reads its input once and writes its output
once: a tile's 6x6 points of every channel are gathered into a small buffer (zeros beyond the image: the
convolution's padding), transformed there along its rows and then its columns, and written out, the loops over the
channels innermost so that they run in SIMD. The output transform adds the bias, each image's shift
and a residual (which the block would otherwise add in passes of their own) and writes the NHWC image itself;
the backward's transposed output transform sums dY for the bias's and shift's gradients as it reads it, and the
transposed input transform adds each tile's gradient into the image where tiles overlap.

Tensors are float32, their memory laid out as the names say (NHWC: a channels_last image's permute(0, 2, 3, 1));
tiles are numbered image by image, row by row: tile = (n·T1 + i)·T2 + j for the tile whose top-left input point is
(4i − 1, 4j − 1). The formulas are the rows of winograd.py's BT and AT (input: V = Bᵀ d B; output: Y = Aᵀ M A) and
their transposes; tests/test_fast_ops.py holds each kernel to winograd.py's torch form.

Compiled on first use and cached on disk by numba (its own cache, beside this file or in the user's cache folder),
so a later process loads them in a fraction of a second. Work is split over tile rows (images in the backward's
scatter), on as many threads as torch is using at the moment of the call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# float32 constants: an integer one would promote the arithmetic to float64
K2, K4, K5, K8 = np.float32(2), np.float32(4), np.float32(5), np.float32(8)
OPTIONS = dict(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)


@njit(**OPTIONS)
def input_tiles(x, v, t1, t2):
    """V = Bᵀ d B: x (N, H, W, C) -> v (36, N·T1·T2, C), zero-padded by one and up to whole tiles."""
    n_images, h, w, channels = x.shape
    for row in prange(n_images * t1):
        n, i0 = row // t1, (row % t1) * 4 - 1
        d = np.empty((6, 6, channels), dtype=np.float32)
        r = np.empty((6, 6, channels), dtype=np.float32)
        for tj in range(t2):
            j0 = tj * 4 - 1
            for a in range(6):  # the tile, zeros where it overhangs the image (a contiguous copy beats
                for b in range(6):  # reading the image in place with the padding masked)
                    if 0 <= i0 + a < h and 0 <= j0 + b < w:
                        for c in range(channels):
                            d[a, b, c] = x[n, i0 + a, j0 + b, c]
                    else:
                        for c in range(channels):
                            d[a, b, c] = 0.0
            for b in range(6):  # along the tile's columns: r = Bᵀ d
                for c in range(channels):
                    d0, d1, d2, d3, d4, d5 = d[0, b, c], d[1, b, c], d[2, b, c], d[3, b, c], d[4, b, c], d[5, b, c]
                    r[0, b, c] = K4 * d0 - K5 * d2 + d4
                    r[1, b, c] = -K4 * (d1 + d2) + d3 + d4
                    r[2, b, c] = K4 * (d1 - d2) + d4 - d3
                    r[3, b, c] = K2 * (d3 - d1) + d4 - d2
                    r[4, b, c] = K2 * (d1 - d3) + d4 - d2
                    r[5, b, c] = K4 * d1 - K5 * d3 + d5
            tile = row * t2 + tj
            for a in range(6):  # then along its rows: V = r B
                for c in range(channels):
                    d0, d1, d2, d3, d4, d5 = r[a, 0, c], r[a, 1, c], r[a, 2, c], r[a, 3, c], r[a, 4, c], r[a, 5, c]
                    v[a * 6, tile, c] = K4 * d0 - K5 * d2 + d4
                    v[a * 6 + 1, tile, c] = -K4 * (d1 + d2) + d3 + d4
                    v[a * 6 + 2, tile, c] = K4 * (d1 - d2) + d4 - d3
                    v[a * 6 + 3, tile, c] = K2 * (d3 - d1) + d4 - d2
                    v[a * 6 + 4, tile, c] = K2 * (d1 - d3) + d4 - d2
                    v[a * 6 + 5, tile, c] = K4 * d1 - K5 * d3 + d5


@njit(**OPTIONS)
def output_blocks(m, bias, residual, y, t1, t2):
    """Y = Aᵀ M A + bias + residual: m (36, N·T1·T2, C) -> y (N, H, W, C), the blocks cut at the image's edge.
    bias: (1, C) for every image, (N, C) for each its own, or (0, C) for none; residual: (N, H, W, C), or
    (0, 0, 0, 0) for none."""
    n_images, h, w, channels = y.shape
    has_residual = residual.shape[0] > 0
    for row in prange(n_images * t1):
        n, i0 = row // t1, (row % t1) * 4
        r = np.empty((4, 6, channels), dtype=np.float32)
        b = np.zeros(channels, dtype=np.float32)
        if bias.shape[0] > 0:
            b[:] = bias[n if bias.shape[0] > 1 else 0]
        o = np.empty((4, channels), dtype=np.float32)
        for tj in range(t2):
            j0, tile = tj * 4, row * t2 + tj
            for k in range(6):  # along the tile's columns: r = Aᵀ M
                for c in range(channels):
                    m0, m1, m2 = m[k, tile, c], m[6 + k, tile, c], m[12 + k, tile, c]
                    m3, m4, m5 = m[18 + k, tile, c], m[24 + k, tile, c], m[30 + k, tile, c]
                    r[0, k, c] = m0 + m1 + m2 + m3 + m4
                    r[1, k, c] = m1 - m2 + K2 * (m3 - m4)
                    r[2, k, c] = m1 + m2 + K4 * (m3 + m4)
                    r[3, k, c] = m1 - m2 + K8 * (m3 - m4) + m5
            for a in range(4):  # then along its rows: Y = r A
                if i0 + a >= h:
                    break
                for c in range(channels):
                    m0, m1, m2, m3, m4, m5 = r[a, 0, c], r[a, 1, c], r[a, 2, c], r[a, 3, c], r[a, 4, c], r[a, 5, c]
                    o[0, c] = m0 + m1 + m2 + m3 + m4 + b[c]
                    o[1, c] = m1 - m2 + K2 * (m3 - m4) + b[c]
                    o[2, c] = m1 + m2 + K4 * (m3 + m4) + b[c]
                    o[3, c] = m1 - m2 + K8 * (m3 - m4) + m5 + b[c]
                for k in range(min(4, w - j0)):
                    if has_residual:
                        for c in range(channels):
                            y[n, i0 + a, j0 + k, c] = o[k, c] + residual[n, i0 + a, j0 + k, c]
                    else:
                        for c in range(channels):
                            y[n, i0 + a, j0 + k, c] = o[k, c]


@njit(**OPTIONS)
def output_blocks_transposed(dy, dm, sums, t1, t2):
    """The output transform's transpose, dM = A dY Aᵀ: dy (N, H, W, C) -> dm (36, N·T1·T2, C), zeros beyond the
    image's edge; and, where sums is (N·T1, C) rather than (0, C), each row of blocks' sum of dy over its positions
    (the bias's and shift's gradients, read in the same pass)."""
    n_images, h, w, channels = dy.shape
    has_sums = sums.shape[0] > 0
    for row in prange(n_images * t1):
        n, i0 = row // t1, (row % t1) * 4
        g = np.empty((4, 4, channels), dtype=np.float32)
        r = np.empty((6, 4, channels), dtype=np.float32)
        total = np.zeros(channels, dtype=np.float64)  # float64, as torch's sum keeps float32's precision
        for tj in range(t2):
            j0, tile = tj * 4, row * t2 + tj
            for a in range(4):
                for b in range(4):
                    if i0 + a < h and j0 + b < w:
                        for c in range(channels):
                            g[a, b, c] = dy[n, i0 + a, j0 + b, c]
                        if has_sums:
                            for c in range(channels):
                                total[c] += np.float64(g[a, b, c])
                    else:
                        for c in range(channels):
                            g[a, b, c] = 0.0
            for b in range(4):  # along the block's columns: r = A g
                for c in range(channels):
                    y0, y1, y2, y3 = g[0, b, c], g[1, b, c], g[2, b, c], g[3, b, c]
                    r[0, b, c] = y0
                    r[1, b, c] = y0 + y1 + y2 + y3
                    r[2, b, c] = y0 - y1 + y2 - y3
                    r[3, b, c] = y0 + K2 * y1 + K4 * y2 + K8 * y3
                    r[4, b, c] = y0 - K2 * y1 + K4 * y2 - K8 * y3
                    r[5, b, c] = y3
            for a in range(6):  # then along its rows: dM = r Aᵀ
                for c in range(channels):
                    y0, y1, y2, y3 = r[a, 0, c], r[a, 1, c], r[a, 2, c], r[a, 3, c]
                    dm[a * 6, tile, c] = y0
                    dm[a * 6 + 1, tile, c] = y0 + y1 + y2 + y3
                    dm[a * 6 + 2, tile, c] = y0 - y1 + y2 - y3
                    dm[a * 6 + 3, tile, c] = y0 + K2 * y1 + K4 * y2 + K8 * y3
                    dm[a * 6 + 4, tile, c] = y0 - K2 * y1 + K4 * y2 - K8 * y3
                    dm[a * 6 + 5, tile, c] = y3
        if has_sums:
            for c in range(channels):
                sums[row, c] = np.float32(total[c])


@njit(**OPTIONS)
def input_tiles_transposed(dv, dx, t1, t2):
    """The input transform's transpose, summed where tiles overlap: dv (36, N·T1·T2, C) -> dx (N, H, W, C). An
    image's tiles overlap each other, so the images are split over the threads, not the rows; each thread zeroes its
    image before adding into it, while the image is in its cache."""
    n_images, h, w, channels = dx.shape
    for n in prange(n_images):
        dx[n] = 0.0
        r = np.empty((6, 6, channels), dtype=np.float32)
        e = np.empty((6, 6, channels), dtype=np.float32)
        for ti in range(t1):
            i0 = ti * 4 - 1
            for tj in range(t2):
                j0, tile = tj * 4 - 1, (n * t1 + ti) * t2 + tj
                for a in range(6):  # along the tile's rows: r = dV Bᵀ
                    for c in range(channels):
                        v0, v1, v2 = dv[a * 6, tile, c], dv[a * 6 + 1, tile, c], dv[a * 6 + 2, tile, c]
                        v3, v4, v5 = dv[a * 6 + 3, tile, c], dv[a * 6 + 4, tile, c], dv[a * 6 + 5, tile, c]
                        r[a, 0, c] = K4 * v0
                        r[a, 1, c] = -K4 * v1 + K4 * v2 - K2 * v3 + K2 * v4 + K4 * v5
                        r[a, 2, c] = -K5 * v0 - K4 * v1 - K4 * v2 - v3 - v4
                        r[a, 3, c] = v1 - v2 + K2 * v3 - K2 * v4 - K5 * v5
                        r[a, 4, c] = v0 + v1 + v2 + v3 + v4
                        r[a, 5, c] = v5
                for b in range(6):  # then along its columns: e = B r
                    for c in range(channels):
                        v0, v1, v2, v3, v4, v5 = r[0, b, c], r[1, b, c], r[2, b, c], r[3, b, c], r[4, b, c], r[5, b, c]
                        e[0, b, c] = K4 * v0
                        e[1, b, c] = -K4 * v1 + K4 * v2 - K2 * v3 + K2 * v4 + K4 * v5
                        e[2, b, c] = -K5 * v0 - K4 * v1 - K4 * v2 - v3 - v4
                        e[3, b, c] = v1 - v2 + K2 * v3 - K2 * v4 - K5 * v5
                        e[4, b, c] = v0 + v1 + v2 + v3 + v4
                        e[5, b, c] = v5
                for a in range(6):
                    if 0 <= i0 + a < h:
                        for b in range(6):
                            if 0 <= j0 + b < w:
                                for c in range(channels):
                                    dx[n, i0 + a, j0 + b, c] += e[a, b, c]


# G's entries, float32
Q4, S6, T12, T24 = np.float32(1 / 4), np.float32(1 / 6), np.float32(1 / 12), np.float32(1 / 24)


@njit(**OPTIONS)
def filter_tiles(weight, u):
    """U = G g Gᵀ: weight (C_out, 3, 3, C_in) (a channels_last weight's memory) -> u (36, C_out, C_in), each filter's
    transform laid out with the input channels innermost, so that both sides are read and written in SIMD."""
    c_out, _, _, c_in = weight.shape
    for o in prange(c_out):
        r = np.empty((6, 3, c_in), dtype=np.float32)
        for j in range(3):  # along the filter's columns: r = G g
            for c in range(c_in):
                g0, g1, g2 = weight[o, 0, j, c], weight[o, 1, j, c], weight[o, 2, j, c]
                r[0, j, c] = Q4 * g0
                r[1, j, c] = -S6 * (g0 + g1 + g2)
                r[2, j, c] = -S6 * (g0 - g1 + g2)
                r[3, j, c] = T24 * g0 + T12 * g1 + S6 * g2
                r[4, j, c] = T24 * g0 - T12 * g1 + S6 * g2
                r[5, j, c] = g2
        for a in range(6):  # then along its rows: U = r Gᵀ
            for c in range(c_in):
                g0, g1, g2 = r[a, 0, c], r[a, 1, c], r[a, 2, c]
                u[a * 6, o, c] = Q4 * g0
                u[a * 6 + 1, o, c] = -S6 * (g0 + g1 + g2)
                u[a * 6 + 2, o, c] = -S6 * (g0 - g1 + g2)
                u[a * 6 + 3, o, c] = T24 * g0 + T12 * g1 + S6 * g2
                u[a * 6 + 4, o, c] = T24 * g0 - T12 * g1 + S6 * g2
                u[a * 6 + 5, o, c] = g2


@njit(**OPTIONS)
def filter_tiles_transposed(du, dweight):
    """The filter transform's transpose, dg = Gᵀ dU G: du (36, C_out, C_in) -> dweight (C_out, 3, 3, C_in), the
    memory of a channels_last weight's gradient."""
    _, c_out, c_in = du.shape
    for o in prange(c_out):
        s = np.empty((6, 3, c_in), dtype=np.float32)
        for a in range(6):  # along the tile's rows: s = dU G
            for c in range(c_in):
                e0, e1, e2 = du[a * 6, o, c], du[a * 6 + 1, o, c], du[a * 6 + 2, o, c]
                e3, e4, e5 = du[a * 6 + 3, o, c], du[a * 6 + 4, o, c], du[a * 6 + 5, o, c]
                s[a, 0, c] = Q4 * e0 - S6 * (e1 + e2) + T24 * (e3 + e4)
                s[a, 1, c] = S6 * (e2 - e1) + T12 * (e3 - e4)
                s[a, 2, c] = S6 * (e3 + e4 - e1 - e2) + e5
        for j in range(3):  # then along its columns: dg = Gᵀ s
            for c in range(c_in):
                e0, e1, e2, e3, e4, e5 = s[0, j, c], s[1, j, c], s[2, j, c], s[3, j, c], s[4, j, c], s[5, j, c]
                dweight[o, 0, j, c] = Q4 * e0 - S6 * (e1 + e2) + T24 * (e3 + e4)
                dweight[o, 1, j, c] = S6 * (e2 - e1) + T12 * (e3 - e4)
                dweight[o, 2, j, c] = S6 * (e3 + e4 - e1 - e2) + e5
