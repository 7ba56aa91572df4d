"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016), forward and backward.

A 4x4 block of outputs of a 3x3 convolution is read from a 6x6 tile of its input. Transformed, the tile's
convolution becomes 36 products, one per point of the transform, where the direct form takes 4·4·9 = 144:

| code | paper (Lavin & Gray, §4) | shape                      | what it is                              |
|------|--------------------------|----------------------------|-----------------------------------------|
| `BT` | Bᵀ                        | (6, 6)                     | input transform: V = Bᵀ d B             |
| `G`  | G                        | (6, 3)                     | filter transform: U = G g Gᵀ            |
| `AT` | Aᵀ                        | (4, 6)                     | output transform: Y = Aᵀ [U ⊙ V] A      |
| `d`  | d                        | (6, 6) per tile, channel   | an input tile (tiles overlap by 2)      |
| `V`  | V                        | (36, tiles, C_in)          | transformed tiles                       |
| `U`  | U                        | (36, C_in, C_out)          | transformed filters                     |
| `M`  | M = Σ_c U ⊙ V             | (36, tiles, C_out)         | 36 matrix products over the channels    |

The points are 0, ±1, ±2 and ∞, as in the paper's F(4x4, 3x3). Each 2-D transform is a product with a
Kronecker product (vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d)), taken as two products with the 1-D matrix, one along the
tile's rows and one along its columns (`_separable`: 432 multiplications a 6x6 tile where the 36x36 square takes
1,296), and the channels' sum is 36 batched matrix products, so all the arithmetic runs in the BLAS. The backward
is the same algorithm's chain rule: dM = (Aᵀ ⊗ Aᵀ)ᵀ dY, dU = Vᵀ dM, dV = dM Uᵀ, then each transform transposed (the
input's tiles summed where they overlap).

In float32 on the CPU the four tile transforms (input, output and their transposes in the backward) and the
filter's and its transpose run as numba's compiled kernels (winograd_kernels.py: one pass over memory each, where
the products with the 1-D matrix and the copies around them take four; a filter's has only 9 points, but training
transforms every weight twice a step); the products with the filters stay torch's bmm. Without numba, in float64
(the tests' numerical checks) and where `KERNELS` is False, the torch form below runs.

Rounding: in float32 the outputs are within ~1e-5 of the largest (tests/test_fast_ops.py), where a direct
convolution's are within ~1e-6; the transforms' constants (up to 8 and 1/24) amplify it, as in every F(4x4, 3x3).
Which convolutions take this path, and why, is fast_ops.conv3x3's to say.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import compiled

BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
      (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE, OUT = 6, 4  # an input tile's side, and the side of the output block it gives


@functools.cache
def _matrix(name: str, dtype: torch.dtype, device: torch.device, transposed: bool = False) -> torch.Tensor:
    """A transform's 1-D matrix: input Bᵀ (6, 6), filter G (6, 3), output Aᵀ (4, 6); or its transpose."""
    matrix = torch.tensor({"input": BT, "filter": G, "output": AT}[name], dtype=torch.float64)
    return (matrix.T if transposed else matrix).contiguous().to(dtype=dtype, device=device)


def _separable(name: str, flat: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """(M ⊗ M) @ flat for a transform's matrix M (m, r): flat (r·r, R), a patch's r x r points down its rows,
    row-major, for R patches -> (m·m, R). Two products with M, one per side of the patch, where one with the
    Kronecker square would take r·m times as many multiplications as each."""
    matrix = _matrix(name, flat.dtype, flat.device, transposed)
    m, r = matrix.shape
    rows = (matrix @ flat.reshape(r, -1)).view(m, r, -1)  # the patch's rows transformed: (m, r, R)
    return torch.matmul(matrix, rows).view(m * m, -1)  # then each of them along its columns


def transform_filter(weight: torch.Tensor) -> torch.Tensor:
    """U = G g Gᵀ for every filter: (C_out, C_in, 3, 3) -> (36, C_in, C_out). The compiled kernel's is a transposed
    view of (36, C_out, C_in) memory (the BLAS takes either)."""
    c_out, c_in = weight.shape[:2]
    kernels = _kernels(weight)
    if kernels is not None:
        u = weight.new_empty(TILE * TILE, c_out, c_in)
        kernels("filter_tiles", compiled.numpy(weight.permute(0, 2, 3, 1)), u.numpy())
        return u.transpose(1, 2)
    flat = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return _separable("filter", flat).view(TILE * TILE, c_in, c_out)


def _filter_gradient(v: torch.Tensor, dm: torch.Tensor, c_in: int, c_out: int) -> torch.Tensor:
    """The weight's gradient from the tiles V and dM: dU = Vᵀ dM, then the filter transform's transpose; as a
    channels_last weight (the compiled kernel's) or a view of (3, 3, C_in, C_out) memory (the torch form's)."""
    kernels = _kernels(dm)
    if kernels is not None:
        du = torch.bmm(dm.transpose(1, 2), v)  # dUᵀ: (36, C_out, C_in), the kernel's layout of U
        dw = dm.new_empty(c_out, 3, 3, c_in)
        kernels("filter_tiles_transposed", du.numpy(), dw.numpy())
        return dw.permute(0, 3, 1, 2)
    du = torch.bmm(v.transpose(1, 2), dm).view(TILE * TILE, -1)  # (36, C_in·C_out)
    return _separable("filter", du, transposed=True).view(3, 3, c_in, c_out).permute(3, 2, 0, 1)


def _tiles(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """V = Bᵀ d B for every 6x6 tile of x (N, C, H, W), padded by one as the convolution is and up to whole
    blocks: (36, N·T1·T2, C), and the tiles T1, T2 down and across."""
    n, c, h, w = x.shape
    t1, t2 = -(-h // OUT), -(-w // OUT)
    kernels = _kernels(x)
    if kernels is not None:
        v = x.new_empty(TILE * TILE, n * t1 * t2, c)
        kernels("input_tiles", compiled.nhwc(x), v.numpy(), t1, t2)
        return v, t1, t2
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + OUT * t2 - w, 1, 1 + OUT * t1 - h))  # (N, H', W', C)
    tiles = padded.unfold(1, TILE, OUT).unfold(2, TILE, OUT)  # (N, T1, T2, C, 6, 6), a view
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(TILE * TILE, -1)  # the one gathering copy
    return _separable("input", d).view(TILE * TILE, n * t1 * t2, c), t1, t2


def _blocks(m: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int, int, int], t1: int, t2: int,
            shift: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Y = Aᵀ M A (+ bias) for every tile, laid out as (N, C_out, H, W) in channels_last memory; then + shift
    (N, C_out), each image's own, and + residual (N, C_out, H, W) where given."""
    n, _, h, w = shape
    c_out = m.shape[-1]
    kernels = _kernels(m)
    if kernels is not None:
        y = m.new_empty(n, h, w, c_out)
        added = shift if bias is None else bias[None] if shift is None else shift + bias
        added = m.new_empty(0, c_out) if added is None else added
        kept = compiled.nhwc(residual) if residual is not None else compiled.numpy(m.new_empty(0, 0, 0, 0))
        kernels("output_blocks", m.numpy(), compiled.numpy(added), kept, y.numpy(), t1, t2)
        return y.permute(0, 3, 1, 2)
    y = _separable("output", m.reshape(TILE * TILE, -1)).view(OUT, OUT, n, t1, t2, c_out)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, OUT * t1, OUT * t2, c_out)[:, :h, :w]
    y = y.permute(0, 3, 1, 2)
    return plus(y if bias is None else y + bias[:, None, None], shift, residual)


def plus(y: torch.Tensor, shift: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """y + shift[:, :, None, None] (each image's per-channel shift), then residual + y, each where given."""
    y = y if shift is None else y + shift[:, :, None, None]
    return y if residual is None else residual + y


def _kernels(x: torch.Tensor):
    """run(kernel, *arrays) for one of winograd_kernels' transforms (numba's compiled ones), for a float32 CPU tensor
    where numba is installed; else None (the torch form)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not compiled_transforms():
        return None
    return lambda kernel, *arrays: compiled.run(getattr(compiled.kernels("winograd_kernels"), kernel), *arrays)


def compiled_transforms() -> bool:
    """Whether the float32 transforms run as numba's compiled kernels (fast_ops.winograd_pays' rule follows)."""
    return KERNELS is not False and compiled.kernels("winograd_kernels") is not None


# None: numba's kernels where they can run; False: always the torch form (the tests compare the two)
KERNELS: bool | None = None


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            filters: torch.Tensor | None = None, shift: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """plus(F.conv2d(x, weight, bias, padding=1), shift, residual), by F(4x4, 3x3); differentiable in x, weight, bias,
    shift and residual. `filters`: transform_filter(weight) made beforehand (a network whose weights do not change
    between calls). The shift and residual are added in the output transform, not in passes of their own."""
    tensors = (x, weight, bias, shift, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _Conv3x3.apply(x, weight, bias, shift, residual)
    return _convolve(x, weight, bias, filters, shift, residual)[0]


def _convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              filters: torch.Tensor | None = None, shift: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution without autograd (plus shift and residual), and the transformed tiles V it made on the way."""
    v, t1, t2 = _tiles(x)
    m = torch.bmm(v, transform_filter(weight) if filters is None else filters)
    return _blocks(m, bias, tuple(x.shape), t1, t2, shift, residual), v


class _Conv3x3(torch.autograd.Function):
    """conv3x3 with its backward, the shift and residual added in the output transform as in sampling. It keeps the
    transformed tiles V (2.25x the input) where the weight's gradient needs them, rather than the input F.conv2d
    keeps, so the backward does not transform the input again; the filters (4x the weight, a fraction of the
    activations) are transformed again. The bias's and shift's gradients, sums of dY, are read in the pass that
    transforms dY, and the residual's is dY itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor | None,
                residual: torch.Tensor | None) -> torch.Tensor:
        y, v = _convolve(x, weight, bias, None, shift, residual)
        ctx.save_for_backward(v if ctx.needs_input_grad[1] else None, weight)
        ctx.shape = tuple(x.shape)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        v, weight = ctx.saved_tensors
        n, c_in, h, w = ctx.shape
        c_out = weight.shape[0]
        t1, t2 = -(-h // OUT), -(-w // OUT)
        wants = ctx.needs_input_grad
        dm, sums = _block_gradients(dy, t1, t2, with_sums=wants[2] or wants[3])  # (36, tiles, C_out), (N, C_out)
        dx = dw = None
        if wants[1]:
            dw = _filter_gradient(v, dm, c_in, c_out)
        if wants[0]:
            dx = _tile_gradients(torch.bmm(dm, transform_filter(weight).transpose(1, 2)), ctx.shape, t1, t2)
        return (dx, dw, sums.sum(0) if wants[2] else None, sums if wants[3] else None, dy if wants[4] else None)


def _block_gradients(dy: torch.Tensor, t1: int, t2: int,
                     with_sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output transform's transpose, dM = (Aᵀ ⊗ Aᵀ)ᵀ dY for every 4x4 block of dy (N, C, H, W), zeros beyond
    its edge: (36, N·T1·T2, C); and, `with_sums`, each image's sum of dy over its positions (N, C), else None."""
    n, c, h, w = dy.shape
    kernels = _kernels(dy)
    if kernels is not None:
        dm = dy.new_empty(TILE * TILE, n * t1 * t2, c)
        rows = dy.new_empty(n * t1 if with_sums else 0, c)  # each row of blocks' sums
        kernels("output_blocks_transposed", compiled.nhwc(dy), dm.numpy(), rows.numpy(), t1, t2)
        return dm, rows.view(n, t1, c).sum(1) if with_sums else None
    dyh = F.pad(dy.permute(0, 2, 3, 1), (0, 0, 0, OUT * t2 - w, 0, OUT * t1 - h))  # (N, 4·T1, 4·T2, C)
    blocks = dyh.reshape(n, t1, OUT, t2, OUT, c).permute(2, 4, 0, 1, 3, 5).reshape(OUT * OUT, -1)
    dm = _separable("output", blocks, transposed=True).view(TILE * TILE, -1, c)
    return dm, dy.sum((2, 3)) if with_sums else None


def _tile_gradients(dv: torch.Tensor, shape: tuple[int, int, int, int], t1: int, t2: int) -> torch.Tensor:
    """The input transform's transpose: dV (36, N·T1·T2, C) -> the gradient of the input (N, C, H, W), each tile's
    share summed where tiles overlap, in channels_last memory."""
    n, c, h, w = shape
    kernels = _kernels(dv)
    if kernels is not None:
        dx = dv.new_empty(n, h, w, c)
        kernels("input_tiles_transposed", dv.numpy(), dx.numpy(), t1, t2)
        return dx.permute(0, 3, 1, 2)
    dd = _separable("input", dv.reshape(TILE * TILE, -1), transposed=True)
    return _untile(dd.view(TILE, TILE, n, t1, t2, c), h, w)


def _untile(dd: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The gradient of _tiles' gather: (6, 6, N, T1, T2, C) tile gradients summed into (N, C, H, W) where tiles
    overlap. A tile's rows 0-3 fall in its own 4-row block, rows 4-5 in the next block's first two; so too columns."""
    _, _, n, t1, t2, c = dd.shape
    out = dd.new_zeros(n, t1 + 1, OUT, t2 + 1, OUT, c)
    for rows, row_block in ((slice(0, OUT), 0), (slice(OUT, TILE), 1)):
        for cols, col_block in ((slice(0, OUT), 0), (slice(OUT, TILE), 1)):
            part = dd[rows, cols].permute(2, 3, 0, 4, 1, 5)  # (N, T1, r, T2, c, C)
            out[:, row_block:row_block + t1, :part.shape[2], col_block:col_block + t2, :part.shape[4]] += part
    padded = out.view(n, OUT * (t1 + 1), OUT * (t2 + 1), c)
    return padded[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2)
