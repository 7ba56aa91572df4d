"""Speed tricks, each beside the plain PyTorch it stands for.

Every function here computes what its docstring's "Plain:" line computes (tests/test_fast_ops.py
checks each pair); the rest of the engine calls these so that the U-Net and the training loop
read as architecture and algorithm. How much each one gains, and on what, is measured by
`benchmarks/forms.py`, `benchmarks/attention.py` and `benchmarks/train_speed.py` (docs/speed.md).
"""

from __future__ import annotations

import ctypes
import platform
from typing import Callable

import torch
import torch.nn.functional as F

from . import compiled


# -- the U-Net -------------------------------------------------------------------------------
def uniform16_like(x: torch.Tensor) -> torch.Tensor:
    """int16 draws, uniform on [-2^15, 2^15), shaped and laid out like x: four per 64-bit draw of
    torch's generator for x's device (so torch.manual_seed makes them reproducible)."""
    like = torch.empty_like(x, dtype=torch.int16)  # x's strides when x is dense, else contiguous ones
    words = torch.empty((like.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    return words.view(torch.int16)[:like.numel()].as_strided(like.shape, like.stride())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout whose CPU mask costs a quarter of a random draw an element. Plain: F.dropout(x, p, training).

    torch's CPU dropout draws one Bernoulli variable at a time. Here an element is dropped when its
    16-bit uniform falls below round(p·2^16), and kept ones are scaled by 1 / (1 - p'), p' that
    rounded probability, so that E[output] = x exactly as in F.dropout (p' is within 2^-17 of p).
    GPUs and torch.compile keep F.dropout, whose fused kernels draw their masks as they go.
    """
    if not training or not 0 < p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    dropped = round(p * 2**16)
    keep = uniform16_like(x) >= dropped - 2**15
    return torch.where(keep, x * (1 / (1 - dropped / 2**16)), 0)


def fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps (w0, w1, w2) of a kernel along dim, as the 4 taps of a stride-2 transposed convolution.

    After a 2x nearest upsampling, output 2i reads upsampled inputs 2i-1, 2i, 2i+1, which are inputs
    i-1, i, i, and output 2i+1 reads inputs i, i, i+1. A transposed convolution with stride 2 and
    padding 1 gives output o the sum of x[i] * k[o + 1 - 2i]: x[i-1] k3 + x[i] k1 for o = 2i, and
    x[i] k2 + x[i+1] k0 for o = 2i+1. So k = (w2, w1 + w2, w0 + w1, w0).
    """
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  kernel: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """A 3x3 convolution of the 2x nearest-upsampled x, as one transposed convolution of x (fold_taps).
    Plain: F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1).

    Each output pixel sees 2x2 input pixels, so it costs 16/36 of the FLOPs of the convolution at
    the upsampled resolution, and the upsampled copy of x is never made. `kernel()`: transposed_kernel(weight),
    kept by the caller for a weight that does not change (sampling), else None.

    Where a gradient is taken and Winograd pays at the upsampled size (winograd_pays: a CPU without AVX-512, in
    float32), the plain form runs instead, its convolution by conv3x3: oneDNN's backward of the transposed
    convolution costs there about twice its forward, Winograd's about its forward, and its quarter of the
    products outweighs the enlarged copy (`python benchmarks/forms.py --change enlarged`, docs/speed.md).
    """
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if training and ENLARGE is not False and winograd_pays(x, weight, upsampled=True):
        return conv3x3(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias)
    kept = kernel() if kernel is not None and not torch.is_grad_enabled() else None
    return F.conv_transpose2d(x, transposed_kernel(weight) if kept is None else kept, bias, stride=2, padding=1)


# None: upsample_conv enlarges and convolves by Winograd in training where it pays; False: always the transposed
# convolution (benchmarks/forms.py compares the two, in one process)
ENLARGE: bool | None = None


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (in, out, 4, 4) kernel of upsample_conv's transposed convolution, from the 3x3 weight (out, in, 3, 3)."""
    return fold_taps(fold_taps(weight, 2), 3).transpose(0, 1)


def winograd_pays(x: torch.Tensor, weight: torch.Tensor, upsampled: bool = False) -> bool:
    """Whether conv3x3 takes Winograd's F(4x4, 3x3) for this input and weight (winograd.py), by measurement
    layer by layer (`python benchmarks/winograd_layers.py`, docs/speed.md): on a CPU without AVX-512, whose
    oneDNN convolutions run below half the speed of its matrix products and whose backward costs over twice their
    forward, in float32. The transforms cost in proportion to the channels in (the tiles) and out (the blocks),
    the products saved to their product, so what decides is the channels' harmonic mean c = 2·in·out/(in + out)
    and the side. With numba's one-pass transforms (winograd_kernels.py): where there is a backward, c ≥ 40 from
    8x8 up; where there is none (sampling, the filters kept), c ≥ 32 and c·side ≥ 256 from 4x4 up. With torch's
    transforms (numba missing), which cost three times as much: c ≥ 48 and c·side ≥ 1024 from 8x8 up with a
    backward, c ≥ 96 and c·side ≥ 512 from 4x4 up without. With fewer channels the transforms cost more than they
    save; at 4x4 with a backward, one block an image does. Never under autocast (bf16's rounding would grow by the
    transforms' constants), on a GPU or compiled. `upsampled`: for x enlarged 2x (upsample_conv), before it is."""
    if (WINOGRAD is False or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling() or x.ndim != 4):
        return False
    if WINOGRAD:
        return True
    from .device import cpu_kernels

    if cpu_kernels().avx512:
        return False
    c_out, c_in = weight.shape[:2]
    c, side = 2 * c_in * c_out / (c_in + c_out), min(x.shape[-2:]) * (2 if upsampled else 1)
    backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    from .winograd import compiled_transforms

    if compiled_transforms():
        return side >= 8 and c >= 40 if backward else side >= 4 and c >= 32 and c * side >= 256
    if backward:
        return side >= 8 and c >= 48 and c * side >= 1024
    return side >= 4 and c >= 96 and c * side >= 512


# None: winograd_pays decides; True or False: always or never (benchmarks/forms.py compares the two, in one process)
WINOGRAD: bool | None = None


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            filters: Callable[[], torch.Tensor] | None = None, shift: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 convolution of stride 1, padded by one, plus each image's shift (N, C_out) and a residual where given.
    Plain: winograd.plus(F.conv2d(x, weight, bias, padding=1), shift, residual).

    Where winograd_pays, by F(4x4, 3x3): 36 products where the direct form takes 144 for each 4x4 block of
    outputs and input channel, in matrix products, and the shift and residual added in its output transform
    rather than in two more passes over the output; the output comes back in x's memory format.
    `filters()`: the weight's Winograd transform, kept by the caller for a weight that does not change (sampling),
    else None."""
    from . import winograd

    if not winograd_pays(x, weight):
        return winograd.plus(F.conv2d(x, weight, bias, padding=1), shift, residual)
    kept = filters() if filters is not None and not torch.is_grad_enabled() else None
    y = winograd.conv3x3(x, weight, bias, kept, shift, residual)  # channels_last
    return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """GroupNorm, and the SiLU after it where `silu`. Plain: F.silu(norm(x)) if silu else norm(x).

    torch's CPU GroupNorm on channels_last memory below 1,024 positions reads each group's few channels at a
    stride of all of them, at 3-8x the time of the same norm on contiguous memory; in float32 on the CPU, where
    numba is installed (norm_pays), norm_kernels.py's two passes take it instead (GroupNormSiLU).
    Elsewhere (GPUs, autocast, contiguous memory, compiled) torch's own."""
    if not norm_pays(x, norm):
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y) if silu else y
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad):
        return GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    return _group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)[0]  # sampling: nothing to record


def norm_pays(x: torch.Tensor, norm: torch.nn.GroupNorm) -> bool:
    """Whether group_norm takes norm_kernels: a float32 channels_last image on the CPU, where numba is installed.
    Measured at `small`'s shapes (`python benchmarks/forms.py --change norm`, docs/speed.md): with the SiLU, in
    sampling 1.7-2.8x as fast below 32x32 and level at it, and in training level to 1.7x."""
    if (NORM_KERNELS is False or x.device.type != "cpu" or x.dtype != torch.float32 or x.ndim != 4
            or not norm.affine or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
        return False
    return compiled.kernels("norm_kernels") is not None


# None: norm_pays decides; False: torch's GroupNorm always (the tests and benchmarks/forms.py compare the two)
NORM_KERNELS: bool | None = None


class GroupNormSiLU(torch.autograd.Function):
    """norm_kernels' GroupNorm, and its SiLU where asked. It keeps the norm's input and each group's mean and 1/std;
    the backward makes the norm's output again where the SiLU's gradient needs it, inside its first pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                silu: bool) -> torch.Tensor:
        y, mean, rstd = _group_norm(x, weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.silu, ctx.eps = silu, eps
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        dx = x.new_empty(n, h, w, c)
        dweight, dbias = x.new_empty(n, c), x.new_empty(n, c)
        compiled.run(compiled.kernels("norm_kernels").backward, _positions(dy), _positions(x), compiled.numpy(weight),
                     compiled.numpy(bias), mean.numpy(), rstd.numpy(), dx.view(n, h * w, c).numpy(), dweight.numpy(),
                     dbias.numpy(), ctx.silu)
        return dx.permute(0, 3, 1, 2), dweight.sum(0), dbias.sum(0), None, None, None


def _group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                silu: bool = False):
    """norm_kernels.forward: the normalised x (its SiLU where `silu`) in channels_last memory, and each group's mean
    and 1/std (N, G)."""
    n, c, h, w = x.shape
    y = x.new_empty(n, h, w, c)
    mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
    compiled.run(compiled.kernels("norm_kernels").forward, _positions(x), compiled.numpy(weight), compiled.numpy(bias),
                 groups, eps, y.view(n, h * w, c).numpy(), mean.numpy(), rstd.numpy(), silu)
    return y.permute(0, 3, 1, 2), mean, rstd


def _positions(x: torch.Tensor):
    """An image batch (N, C, H, W) as the (N, H·W, C) numpy array of its channels_last memory."""
    n, c, h, w = x.shape
    return compiled.nhwc(x).reshape(n, h * w, c)


# Up to this many positions (8x8: `small`'s layer at 32x32) the CPU's math path on strided views beats its
# flash kernel; above it the flash kernel wins, and it never holds the (positions x positions) scores.
CPU_MATH_POSITIONS = 64


def fused_attention_layout(qkv: torch.Tensor) -> bool:
    """Whether attention copies q, k and v (B, 3, heads, positions, channels) to contiguous channels, the layout
    SDPA's fused kernels need.

    Flash, memory-efficient and cuDNN attention all require stride 1 in the last dimension; strided views there
    silently fall back to the math path, which materialises every score. A channels_last image's qkv has its
    channels contiguous already, and the CPU's flash kernel takes those views as they are. GPUs always take the
    copy; the CPU takes it where the channels are strided (contiguous NCHW memory) and above CPU_MATH_POSITIONS.
    Either layout computes the same attention; only the kernel SDPA picks differs.
    """
    return qkv.device.type != "cpu" or (qkv.stride(-1) != 1 and qkv.shape[-2] > CPU_MATH_POSITIONS)


# -- the optimizer step ----------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, weight: torch.Tensor) -> None:
    """ema += weight · (model - ema), for every parameter at once; weight = 1 - decay (0 for a skipped step).
    Plain: for e, p in zip(ema.parameters(), model.parameters()): e.lerp_(p, weight).

    On a GPU the weight stays a tensor, so that the host never waits and a CUDA graph can
    change it between replays; torch's foreach lerp takes no tensor weight, hence three passes.
    On the CPU reading it costs nothing, and one lerp pass over every tensor is fastest."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if weight.device.type == "cpu":
        torch._foreach_lerp_(ema_params, params, weight.item())
        return
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_params, delta)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a bool tensor) is set. Plain: if not skip.item(): optimizer.step().

    Fused AdamW reads the flag on the device (the found_inf protocol of torch's GradScaler), so the
    host never waits for the step's result; other kernels need it on the host."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()


# -- the host --------------------------------------------------------------------------------
def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on device without the host waiting for the device. Plain: t.to(device).

    A CUDA copy from ordinary (pageable) memory first waits for every kernel queued on the stream,
    so it goes through pinned memory instead (whose block torch keeps until the copy is done)."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def keep_cpu_memory() -> bool:
    """Let glibc's malloc reuse freed memory for blocks up to 32 MiB instead of returning it.
    Plain: glibc's defaults, which change no result, only how memory is got.

    By default glibc maps every large block from the OS and unmaps it on free, so each CPU
    training step page-faults its activations in afresh; kept, they are reused. Peak memory is
    unchanged. A process-wide setting, so the CLI calls it, not the engine. Returns False where
    the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))
