"""The U-Net of Ho et al. 2020 (their CIFAR-10 network is the `ddpm-cifar10` preset).

It maps (x_t, t) to one image-shaped output and knows nothing of the diffusion around it:
what that output means (ε, x_0 or v) is decided by the objective, outside this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) t, as in Transformer position codes. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero so that each block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def uniform16_like(x: torch.Tensor) -> torch.Tensor:
    """int16 draws, uniform on [-2^15, 2^15), shaped and laid out like x: four per 64-bit draw of
    torch's generator for x's device (so torch.manual_seed makes them reproducible)."""
    like = torch.empty_like(x, dtype=torch.int16)  # x's strides when x is dense, else contiguous ones
    words = torch.empty((like.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    return words.view(torch.int16)[:like.numel()].as_strided(like.shape, like.stride())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, with a CPU mask that costs a quarter of a random draw an element.

    torch's CPU dropout draws one Bernoulli variable at a time, ~8 ns an element here: 10% of a
    `ddpm-cifar10` step. Here an element is dropped when its 16-bit uniform falls below
    round(p·2^16), and kept ones are scaled by 1 / (1 - p'), p' that rounded probability, so that
    E[output] = x exactly as in F.dropout (p' is within 2^-17 of p). GPUs and torch.compile keep
    F.dropout, whose fused kernels draw their masks as they go.
    """
    if not training or not 0 < p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    dropped = round(p * 2**16)
    keep = uniform16_like(x) >= dropped - 2**15
    return torch.where(keep, x * (1 / (1 - dropped / 2**16)), 0)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + projected SiLU(embedding), GroupNorm, SiLU, dropout, conv; skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


# Up to this many positions (8x8: `small`'s layer at 32x32) the CPU's math path on strided views beats its
# flash kernel in bf16 (3.7 against 7.0 ms at batch 16); from 16x16 on the flash kernel wins, 1.6-2.7x at 32x32,
# and it never holds the (positions x positions) scores: 74 MB against 1.6 GB for `small`'s layer at 64x64,
# batch 4 (benchmarks/attention.py --image-sizes).
CPU_MATH_POSITIONS = 64


def fused_attention_layout(device: torch.device, positions: int) -> bool:
    """Whether attention copies q, k and v to contiguous channels, the layout SDPA's fused kernels need.

    Flash, memory-efficient and cuDNN attention all require stride 1 in the last dimension; the
    strided views of the qkv convolution's output silently fall back to the math path, which
    materialises every score. GPUs always take the copy; the CPU takes it above CPU_MATH_POSITIONS.
    """
    return device.type != "cpu" or positions > CPU_MATH_POSITIONS


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, through SDPA (fused kernels on GPUs)."""

    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2)
        if fused_attention_layout(x.device, H * W):
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


def fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps (w0, w1, w2) of a kernel along dim, as the 4 taps of a stride-2 transposed convolution.

    After a 2x nearest upsampling, output 2i reads upsampled inputs 2i-1, 2i, 2i+1, which are inputs
    i-1, i, i, and output 2i+1 reads inputs i, i, i+1. A transposed convolution with stride 2 and
    padding 1 gives output o the sum of x[i] * k[o + 1 - 2i]: x[i-1] k3 + x[i] k1 for o = 2i, and
    x[i] k2 + x[i+1] k0 for o = 2i+1. So k = (w2, w1 + w2, w0 + w1, w0).
    """
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)), computed as one transposed convolution of x (fold_taps).

    Each output pixel sees 2x2 input pixels, so it costs 16/36 of the FLOPs of the convolution at
    the upsampled resolution, and the upsampled copy of x is never made. Equal to upsample-then-conv
    up to rounding, with the same parameters.
    """
    kernel = fold_taps(fold_taps(weight, 2), 3)  # (out, in, 4, 4)
    return F.conv_transpose2d(x, kernel.transpose(0, 1), bias, stride=2, padding=1)


class UpsampleConv(nn.Conv2d):
    """nn.Conv2d (3x3) of the 2x nearest-upsampled input, through `upsample_conv`: its own hooks still fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.weight, self.bias)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (computed as upsample_conv)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = UpsampleConv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Stage(nn.Module):
    """A residual block, followed by attention at the chosen resolutions."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, attn: bool, head_channels: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, dropout)
        self.attn = Attention(out_ch, head_channels) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """(x_t, t) -> output of x_t's shape; t is a (B,) tensor of step indices, fractional allowed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        base, emb_ch = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(cfg.channels, base, 3, padding=1)
        stage = lambda i, o, res: Stage(i, o, emb_ch, cfg.dropout, res in cfg.attention_resolutions,  # noqa: E731
                                        cfg.head_channels)

        self.down = nn.ModuleList()
        skips, ch, res = [base], base, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(ch, base * mult, res))
                ch = base * mult
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, cfg.dropout), Attention(ch, cfg.head_channels),
                                  ResBlock(ch, ch, emb_ch, cfg.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), base * mult, res))
                ch = base * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, cfg.channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, Stage):
                h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def layer_outputs(model: UNet, batch: int) -> int:
    """Elements of every layer's output in a forward pass of `batch` images (one image, counted and
    scaled): the memory a training step keeps for its backward grows with it."""
    counts: list[int] = []
    hooks = [module.register_forward_hook(lambda module, args, out: counts.append(out.numel()))
             for module in model.modules() if not any(module.children())]
    was_training, device, cfg = model.training, next(model.parameters()).device, model.cfg
    try:
        model.eval()  # no dropout: it would draw from the generator
        model(torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size, device=device), torch.zeros(1, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return batch * sum(counts)
