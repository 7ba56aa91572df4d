"""The U-Net of Ho et al. 2020 (their CIFAR-10 network is the `ddpm-cifar10` preset).

It maps (x_t, t) to one image-shaped output and knows nothing of the diffusion around it:
what that output means (ε, x_0 or v) is decided by the objective, outside this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_ops
from ..config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0,
                       cos_first: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) t, as in Transformer position codes: sin and cos of t
    times exp(-ln(max_period) i / (dim/2 - shift)), i < dim/2 (ModelConfig.time_freq_shift). (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()] if cos_first else [args.sin(), args.cos()], dim=1)


def group_norm(channels: int, min_per_group: int = 1, eps: float = 1e-5) -> GroupNorm:
    """GroupNorm with up to 32 groups (Ho et al.), halved until each holds at least min_per_group channels.

    A group of one channel subtracts that channel's mean, and with it the per-channel bias that the
    time and class embeddings add just before: min_per_group 2 keeps them (ModelConfig.norm_group_min)."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_per_group:
        groups //= 2
    return GroupNorm(groups, channels, eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed by fast_ops.group_norm (numba's kernels on a float32 channels_last CPU image);
    `silu=True` applies a SiLU after it."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return fast_ops.group_norm(x, self, silu)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero so that each block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class KeptTransform:
    """A weight's transform made once and kept until the weight changes (its version or storage): in sampling the
    weights are constant, so each call reuses it."""

    def __init__(self, make):
        self.make, self.key, self.value = make, None, None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, weight.data_ptr())
        if self.key != key:
            self.key, self.value = key, self.make(weight.detach())
        return self.value


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in, out, 3, padding=1), computed by fast_ops.conv3x3; its hooks still fire (and see the shift and
    residual a caller adds). In sampling, the weight's Winograd transform is kept (KeptTransform)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)
        from .winograd import transform_filter

        # kept in (36, in, out) memory, which the filters' products read fastest, call after call
        self._filters = KeptTransform(lambda weight: transform_filter(weight).contiguous())

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution, + shift[:, :, None, None] (N, out) and then + residual where given."""
        return fast_ops.conv3x3(x, self.weight, self.bias, lambda: self._filters(self.weight), shift, residual)


class Dropout(nn.Dropout):
    """nn.Dropout, computed by fast_ops.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_ops.dropout(x, self.p, self.training)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + projected SiLU(embedding), GroupNorm, SiLU, dropout, conv; skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, norm_min: int = 1, eps: float = 1e-5):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_min, eps)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.emb = nn.Linear(emb_ch, out_ch)
        self.norm2 = group_norm(out_ch, norm_min, eps)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(Conv3x3(out_ch, out_ch))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True), shift=self.emb(F.silu(emb)))
        return self.conv2(self.dropout(self.norm2(h, silu=True)), residual=self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, through SDPA (fused kernels on GPUs)."""

    def __init__(self, ch: int, head_channels: int, norm_min: int = 1, eps: float = 1e-5):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = group_norm(ch, norm_min, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2)
        if fast_ops.fused_attention_layout(qkv):  # same result, faster kernel
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        if x.is_contiguous(memory_format=torch.channels_last):  # the heads' channels side by side, as x's are
            h = h.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """A 3x3 convolution of stride 2; padding 0 pads only the right and bottom edges, by one (TensorFlow's)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x if self.conv.padding != (0, 0) else F.pad(x, (0, 1, 0, 1)))


class UpsampleConv(nn.Conv2d):
    """nn.Conv2d (3x3) of the 2x nearest-upsampled input, computed by fast_ops.upsample_conv; its hooks still fire.
    In sampling, the transposed convolution's kernel is kept (KeptTransform)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kernel = KeptTransform(lambda weight: fast_ops.transposed_kernel(weight).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_ops.upsample_conv(x, self.weight, self.bias, lambda: self._kernel(self.weight))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = UpsampleConv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Stage(nn.Module):
    """A residual block, followed by attention at the chosen resolutions."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, attn: bool, head_channels: int,
                 norm_min: int = 1, eps: float = 1e-5):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, dropout, norm_min, eps)
        self.attn = Attention(out_ch, head_channels, norm_min, eps) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """(x_t, t[, class labels]) -> output of x_t's shape; t is a (B,) tensor of step indices, fractional allowed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        base, emb_ch = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(cfg.channels, base, 3, padding=1)
        norm_min, eps = cfg.norm_group_min, cfg.norm_eps
        stage = lambda i, o, res: Stage(i, o, emb_ch, cfg.dropout, res in cfg.attention_resolutions,  # noqa: E731
                                        cfg.head_channels, norm_min, eps)

        self.down = nn.ModuleList()
        skips, ch, res = [base], base, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(ch, base * mult, res))
                ch = base * mult
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch, cfg.downsample_padding))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, cfg.dropout, norm_min, eps),
                                  Attention(ch, cfg.head_channels, norm_min, eps),
                                  ResBlock(ch, ch, emb_ch, cfg.dropout, norm_min, eps)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), base * mult, res))
                ch = base * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.out = nn.Sequential(group_norm(ch, norm_min, eps), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, cfg.channels, 3, padding=1)))
        # Made last, so that a conditional model's other weights start as the unconditional one's would. Not
        # zero: the residual branches start at zero, so a zero embedding would get no gradient for many steps.
        # N(0, 1) as nn.Embedding draws it, but not on the meta device (a checkpoint's shape check), where torch's
        # random draws run its Python reference and import its compiler: seconds of every load.
        self.class_emb = None
        if cfg.class_names:
            rows = len(cfg.class_names) + 1
            self.class_emb = nn.Embedding(rows, emb_ch, _weight=torch.empty(rows, emb_ch))
            if not self.class_emb.weight.is_meta:
                nn.init.normal_(self.class_emb.weight)
        # Recompute each residual block's activations in the backward instead of keeping them (training's
        # --checkpointing): the memory of one block instead of all, for one more forward of each block.
        self.checkpointing = False

    def checkpointed_blocks(self) -> list[nn.Module]:
        """The blocks --checkpointing recomputes: each stage (residual block and its attention) and the middle's."""
        return [b for b in (*self.down, *self.mid, *self.up) if _recomputed(b)]

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled() and _recomputed(block):
            return checkpoint(block, h, emb, use_reentrant=False)  # dropout's draws are replayed: the same masks
        return block(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """labels: (B,) class indices, len(class_names) for "no class" (None: no class for every image)."""
        cfg = self.cfg
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels, shift=cfg.time_freq_shift,
                                               cos_first=cfg.time_cos_first).to(x.dtype))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full(t.shape, len(self.cfg.class_names), dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(labels).to(emb.dtype)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            if isinstance(block, Stage):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.out(h)


def _recomputed(block: nn.Module) -> bool:
    """Whether --checkpointing recomputes this block: all but the resampling convolutions, which keep little."""
    return not isinstance(block, (Downsample, Upsample))


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
