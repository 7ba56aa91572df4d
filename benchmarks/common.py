"""Shared by the benchmarks: a feature-space distance between image sets, timing helpers, common options.

No pretrained network can be downloaded here, so the features come from a fixed, randomly
initialised convolutional network (seeded, identical on every machine): multi-scale
average-pooled activations, 448 numbers an image. The random-feature FD is the Fréchet
distance between Gaussian fits of two feature sets (FID's formula). It is biased upwards at
small n, so compare it only at equal n; `python benchmarks/common.py` prints anchors: two
draws of the built-in data, the same blurred, and noise. (KID was tried and dropped: at
256 images it moved by hundreds of its units between identical set-ups.)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F
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


def _features(images: torch.Tensor) -> torch.Tensor:
    net = RandomFeatures(images.shape[1])
    return torch.cat([net(chunk) for chunk in images.split(256)])


def image_fd(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    return frechet_distance(_features(images_a), _features(images_b))



def train_step_fn(model: nn.Module, net, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, precision: str,
                  optimizer: torch.optim.Optimizer | None = None, cuda_graph: bool = True,
                  on_fallback=lambda why: None):
    """One training step: v-loss with min-SNR-5, backward, clip at 1, AdamW, EMA.

    By default it is `diffuse train`'s own step (step.optimizer_step with fused AdamW, replayed
    as a CUDA graph on a GPU). Pass an optimizer (torch's plain AdamW, say) to time instead a
    plain eager step as another tool's training script takes it. `on_fallback(why)` hears of a capture that
    failed (the step then runs eagerly)."""
    import copy

    from diffuse_cli.config import Config, TrainConfig
    from diffuse_cli.presets import model_config
    from diffuse_cli.network.device import autocast, layout_of
    from diffuse_cli.diffusion.objectives import diffusion_loss
    from diffuse_cli.diffusion.schedule import NoiseSchedule
    from diffuse_cli.network.graphs import graphed_step
    from diffuse_cli.training.step import StepTensors, make_optimizer, optimizer_step

    schedule = NoiseSchedule.make("cosine")
    ema = copy.deepcopy(model).requires_grad_(False)
    if optimizer is not None:
        ema_params = list(ema.parameters())

        def step() -> None:
            with autocast(precision, x0.device):
                loss = diffusion_loss(net, "v", schedule, x0, t, eps, 5.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 0.001)
        return step

    # the step reads the recipe (v, min-SNR-5, clip 1) from a config, and the image shape from its model part
    config = Config(model=model_config("tiny", image_size=x0.shape[-1]), train=TrainConfig(lr=1e-4))
    use_graph = cuda_graph and x0.device.type == "cuda" and precision != "fp16"
    opt = make_optimizer(model, config.train, capturable=use_graph)
    io = StepTensors.allocate(config, x0.shape[0], x0.device, layout_of(model))
    io.x0[0].copy_(x0), io.t[0].copy_(t), io.eps[0].copy_(eps), io.ema_weight.fill_(0.001)
    scaler = torch.amp.GradScaler(x0.device.type, enabled=precision == "fp16")
    step = functools.partial(optimizer_step, net, model, ema, opt, scaler, config, schedule, precision, io)
    return graphed_step(step, on_fallback=on_fallback) if use_graph else step


def grid_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that measures a grid of presets x batches x precisions on one device. Without
    --precisions, bf16 is measured only where it is native (on a CPU that emulates it, a bf16 step takes ~5x as
    long as fp32's, and a full grid hours)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "ddpm-cifar10"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--precisions", nargs="+", default=None, help="fp32, bf16 (default: both where bf16 is "
                        "native, fp32 alone on a CPU without it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS),
                        help="run torch's CPU kernels at this instruction set (both tools): avx2 makes an AVX-512 or "
                        "AMX machine run what a laptop without them runs (ATen, oneDNN and MKL told so)")
    return parser


# The variables that cap each library's CPU kernels at an instruction set. They are read when the libraries load,
# so a process is started with them (with_isa).
ISA_ENVIRONMENTS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def with_isa(isa: str | None) -> None:
    """Restart this benchmark (same arguments) with torch's kernels capped at `isa`, unless they already are; the
    processes it starts inherit the cap."""
    import os

    wanted = ISA_ENVIRONMENTS.get(isa or "", {})
    if wanted and any(os.environ.get(k) != v for k, v in wanted.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def parse_grid(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a grid benchmark's options: restart under --isa, and fill in the precisions the device computes."""
    from diffuse_cli.network.device import cpu_kernels

    args = parser.parse_args()
    with_isa(args.isa)
    if args.precisions is None:
        native = torch.device(args.device).type != "cpu" or cpu_kernels().bf16
        args.precisions = ["fp32", "bf16"] if native else ["fp32"]
    return args


def machine_line(device: str) -> str:
    """The first line a speed benchmark prints: torch, threads, and the CPU as torch's kernels see it."""
    import platform

    from diffuse_cli.network.device import cpu_kernels

    kernels = cpu_kernels()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU capability {kernels.describe()} ({'native' if kernels.bf16 else 'no native'} bf16), {cpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")


def upsample_then_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel=None) -> torch.Tensor:
    """The U-Net's upsampling as drawn, and as diffusers computes it; ours is fast_ops.upsample_conv (whose kept
    `kernel` this form has no use for)."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def step_flops(model: nn.Module, net, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, precision: str) -> int:
    """FLOPs of one training step's forward and backward (the v-loss), counted by torch; grads are cleared after.

    Counted on the network as drawn: each Upsample as a 3x3 convolution of the upsampled image, as
    diffusers computes it, not upsample_conv's 16/36 of that, and each 3x3 convolution directly, not by Winograd's
    quarter of the products. Both sides of a comparison are then
    credited the same work, and a faster way to do it shows as a higher share of peak."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    from diffuse_cli.network import fast_ops
    from diffuse_cli.network.device import autocast
    from diffuse_cli.diffusion.objectives import diffusion_loss
    from diffuse_cli.diffusion.schedule import NoiseSchedule

    with mock.patch.object(fast_ops, "upsample_conv", upsample_then_conv), mock.patch.object(fast_ops, "WINOGRAD", False), \
            FlopCounterMode(display=False) as counter, autocast(precision, x0.device):
        diffusion_loss(net, "v", NoiseSchedule.make("cosine"), x0, t, eps).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronizer(device: torch.device):
    """Waits for the device's queued work: a no-op on the CPU, which runs eagerly."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, repeats: int = 3, warmup: int = 1, best: bool = False, block: int = 1, sync=lambda: None) -> float:
    """Median (or with `best`, least) seconds per fn() over repeats, after warmup calls.

    Each repeat times `block` calls and one `sync()` after them, so that a GPU queue stays
    full, as it does in a training run, rather than draining after every call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(block):
            fn()
        sync()
        times.append((time.perf_counter() - start) / block)
    return min(times) if best else sorted(times)[len(times) // 2]


if __name__ == "__main__":
    from diffuse_cli.presets import BUILTIN_IMAGE_SIZE
    from diffuse_cli.images.shapes import render_shapes

    train = render_shapes(2000, BUILTIN_IMAGE_SIZE, seed=0)
    held_out = render_shapes(2000, BUILTIN_IMAGE_SIZE, seed=1)
    noise = torch.randint(0, 256, train.shape, dtype=torch.uint8)
    blurred = nn.functional.avg_pool2d(held_out.float(), 3, 1, 1).round().to(torch.uint8)
    print(f"random-feature FD to {BUILTIN_IMAGE_SIZE}x{BUILTIN_IMAGE_SIZE} built-in images:  2000 vs 2000   512 vs 512"
          "   256 vs 512")
    for name, other in (("held-out built-in images", held_out), ("the same, 3x3 blurred", blurred),
                        ("uniform noise", noise)):
        print(f"  {name:<40}{image_fd(train, other):>12.3f}{image_fd(train[:512], other[:512]):>13.3f}"
              f"{image_fd(train[:512], other[:256]):>13.3f}")
