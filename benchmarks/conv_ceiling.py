"""How close to the practical peak can a training step of a preset get? An upper bound.

Records every convolution one forward pass calls (input and weight shapes, stride, padding),
then times each one alone, forward and backward, at the model's own shapes, layout and
precision, as oneDNN runs it on this CPU. Their sum is what the step's convolutions cost even if
everything around them (norms, activations, attention, optimizer) were free, so

    ceiling = the whole step's FLOPs / (sum of the convolutions' times) / practical peak

is the best share of peak any implementation calling these kernels can reach. The full step is
timed too (`diffuse train`'s own step), to show how much of it is not convolution.

Alone, a convolution runs with its data hot in cache; inside a step it runs a little slower.
`--in-situ` also times the convolutions, GroupNorms and linear layers where they are, inside
full steps of ours and of diffusers' UNet2DModel (the same architecture, trained with torch's
AdamW as in train_speed.py), alternating the two. Both run in this one process, so diffusers
gets our malloc setting too (train_speed.py's "as shipped" leaves it out). Ours can be at most
(diffusers' step) / (our convolutions) times as fast as diffusers, even if everything in our
step but the convolutions cost nothing. The step's FLOPs are the network's as drawn (common.step_flops:
an Upsample counts as a 3x3 convolution of the upsampled image), while each convolution's own
GFLOP/s are of the work it does (our upsampling is a transposed convolution, kernel "4T" below,
at 16/36 of the FLOPs).

    python benchmarks/conv_ceiling.py                       # small, batch 16, bf16
    python benchmarks/conv_ceiling.py --preset ddpm-cifar10 --batch 64 --precision fp32
    python benchmarks/conv_ceiling.py --in-situ             # needs diffusers (pip install -e '.[bench]')
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from common import step_flops, timed, train_step_fn  # noqa: E402
from train_speed import WARMUP_STEPS, contestant, practical_peak  # noqa: E402

from diffuse_cli.presets import model_config  # noqa: E402
from diffuse_cli.network.device import autocast, memory_format  # noqa: E402
from diffuse_cli.network.fast_ops import keep_cpu_memory  # noqa: E402
from diffuse_cli.network.unet import UNet  # noqa: E402

CONVOLUTIONS = (torch.conv2d, torch.conv_transpose2d)  # the second is our Upsample (fast_ops.upsample_conv)
ConvCall = collections.namedtuple("ConvCall", "func input_shape weight_shape stride padding")


def conv_call(func, args: tuple, kwargs: dict) -> ConvCall:
    """The shapes and settings of one call func(input, weight, bias, stride, padding, ...)."""
    params = dict(zip(("input", "weight", "bias", "stride", "padding"), args), **kwargs)
    stride, padding = (params.get(name, 1 if name == "stride" else 0) for name in ("stride", "padding"))
    first = lambda value: value if isinstance(value, int) else value[0]  # noqa: E731  (square kernels here)
    return ConvCall(func, tuple(params["input"].shape), tuple(params["weight"].shape), first(stride), first(padding))


class ConvRecorder(TorchFunctionMode):
    """Counts the convolutions called under it, by nn.Conv2d or by a function such as upsample_conv."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS:
            self.calls[conv_call(func, args, kwargs or {})] += 1
        return func(*args, **(kwargs or {}))


def conv_calls(model: UNet, x: torch.Tensor, t: torch.Tensor, precision: str) -> collections.Counter:
    """How many times one forward pass calls each distinct convolution."""
    with torch.no_grad(), autocast(precision, x.device), ConvRecorder() as recorder:
        model(x, t)
    return recorder.calls


def forward_flops(call: ConvCall) -> int:
    """Multiply-adds x 2 of one forward: each pixel on the kernel's sliding side meets the whole weight."""
    n, _, h, w = call.input_shape
    if call.func is torch.conv2d:
        k = call.weight_shape[-1]
        h, w = ((size + 2 * call.padding - k) // call.stride + 1 for size in (h, w))
    return 2 * n * h * w * math.prod(call.weight_shape)


def out_channels(call: ConvCall) -> int:
    return call.weight_shape[0 if call.func is torch.conv2d else 1]


def conv_seconds(call: ConvCall, fmt: torch.memory_format, precision: str, dev: torch.device,
                 input_grad: bool) -> float:
    """Median seconds of one convolution's forward and backward, alone."""
    dtype = torch.bfloat16 if precision == "bf16" and input_grad else torch.float32  # inputs arrive as autocast left them
    x = torch.randn(call.input_shape, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(input_grad)
    w = torch.randn(call.weight_shape, device=dev).contiguous(memory_format=fmt).requires_grad_()
    b = torch.zeros(out_channels(call), device=dev, requires_grad=True)
    with autocast(precision, dev):
        grad = torch.randn_like(call.func(x, w, b, call.stride, call.padding))

    def run() -> None:
        with autocast(precision, dev):
            y = call.func(x, w, b, call.stride, call.padding)
        y.backward(grad)
        x.grad = w.grad = b.grad = None
    return timed(run, repeats=15, warmup=3)


class _Mark(torch.autograd.Function):
    """Identity whose backward notes the time: around a layer, the two marks bracket its backward."""

    @staticmethod
    def forward(ctx, x, clock, edge):
        ctx.clock, ctx.edge = clock, edge
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.backward_mark(ctx.edge)
        return grad, None, None


class Clock:
    """Adds up the seconds some layers take, forward and backward, inside real steps.

    On the CPU every kernel runs synchronously, so wall-clock time around a layer is its cost.
    The autograd engine runs a layer's backward right after its output's gradient is ready; the
    marks only add timing calls (the step is timed again without them)."""

    def __init__(self):
        self.on, self.seconds, self._started = False, 0.0, 0.0

    def timed(self, forward, x, *args, **kwargs):
        x = _Mark.apply(x, self, "input")
        start = time.perf_counter()
        y = forward(x, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        return _Mark.apply(y, self, "output")

    def backward_mark(self, edge: str) -> None:
        now = time.perf_counter()
        if edge == "output":
            self._started = now
        else:
            self.seconds += now - self._started


class LayerClock(Clock):
    """Clocks the modules of one kind."""

    def __init__(self, model: torch.nn.Module, kind: type):
        super().__init__()
        for layer in (m for m in model.modules() if isinstance(m, kind)):
            layer.forward = self._wrap(layer.forward)

    def _wrap(self, forward):
        return lambda x: self.timed(forward, x) if self.on else forward(x)


class ConvClock(Clock, TorchFunctionMode):
    """Clocks every convolution called under it, by nn.Conv2d or by a function such as upsample_conv."""

    def __init__(self):
        Clock.__init__(self)
        TorchFunctionMode.__init__(self)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS and self.on:
            return self.timed(func, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


CLOCKED = {"convolutions": None, "GroupNorm": torch.nn.GroupNorm, "linear": torch.nn.Linear}


def in_situ(preset: str, batch: int, precision: str, rounds: int = 15) -> None:
    """Time both steps plainly and with their layers clocked, alternating; print medians.
    The rest is what the clocks do not cover: activations, attention's matmuls and softmax,
    autocast's casts, the loss, the optimizer and EMA, Python."""
    runs = {}
    for impl in ("ours", "diffusers"):
        model, net, x0, t, eps, optimizer = contestant(impl, preset, batch, precision, torch.device("cpu"),
                                                       our_runtime=impl == "ours")
        clocks = {name: LayerClock(model, kind) if kind else ConvClock() for name, kind in CLOCKED.items()}
        runs[impl] = (train_step_fn(model, net, x0, t, eps, precision, optimizer), clocks, collections.defaultdict(list))
        for _ in range(WARMUP_STEPS):
            runs[impl][0]()
    for _ in range(rounds):
        for step, clocks, times in runs.values():
            start = time.perf_counter()
            step()
            times["step"].append(time.perf_counter() - start)
            for clock in clocks.values():
                clock.on, clock.seconds = True, 0.0
            with clocks["convolutions"]:
                step()
            for name, clock in clocks.items():
                clock.on = False
                times[name].append(clock.seconds)
    ms = {impl: {k: statistics.median(v) * 1e3 for k, v in times.items()} for impl, (*_, times) in runs.items()}
    print(f"\nin situ, median of {rounds} alternating rounds ({preset}, batch {batch}, {precision}), ms:")
    print(f"  {'':<10}{'step':>7}{'convolutions':>14}{'GroupNorm':>11}{'linear':>8}{'the rest':>10}")
    for impl, m in ms.items():
        rest = m["step"] - sum(m[name] for name in CLOCKED)
        print(f"  {impl:<10}{m['step']:>7.0f}{m['convolutions']:>14.0f}{m['GroupNorm']:>11.0f}{m['linear']:>8.0f}"
              f"{rest:>10.0f}")
    print(f"  ours / diffusers: {ms['diffusers']['step'] / ms['ours']['step']:.2f}x now; at most "
          f"{ms['diffusers']['step'] / ms['ours']['convolutions']:.2f}x if all but our convolutions were free")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--in-situ", action="store_true", help="also time the layers inside ours and diffusers' steps")
    args = parser.parse_args()
    dev = torch.device("cpu")
    keep_cpu_memory()
    torch.manual_seed(0)
    fmt = memory_format(dev, args.precision)
    model = UNet(model_config(args.preset, image_size=32)).to(memory_format=fmt)
    x0 = torch.rand(args.batch, 3, 32, 32).mul(2).sub(1).contiguous(memory_format=fmt)
    eps, t = torch.randn_like(x0), torch.randint(0, 1000, (args.batch,))

    flops_of_step = step_flops(model, model, x0, t, eps, args.precision)

    peak = practical_peak(args.precision, dev) * 1e9
    rows, conv_total, conv_flops = [], 0.0, 0
    for call, n in sorted(conv_calls(model, x0, t, args.precision).items(), key=lambda kv: -kv[1]):
        first = call.input_shape[1] == x0.shape[1]  # the input convolution: no gradient for the image
        seconds = conv_seconds(call, fmt, args.precision, dev, input_grad=not first)
        flops = (2 if first else 3) * forward_flops(call)
        rows.append((n, call, seconds, flops))
        conv_total, conv_flops = conv_total + n * seconds, conv_flops + n * flops
    step = train_step_fn(model, model, x0, t, eps, args.precision)
    step_s = timed(step, repeats=7, warmup=8)
    peak = max(peak, practical_peak(args.precision, dev) * 1e9)  # this machine's speed drifts; the larger counts

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}, batch {args.batch}, "
          f"{args.precision}, {fmt}; practical peak {peak / 1e9:.0f} GFLOP/s (the larger of two measurements)")
    print(f"{'calls':>5}  {'input':<20}{'out':>5}{'k':>3}{'s':>3} | {'ms each':>8}{'GFLOP/s':>9}{'% peak':>8}")
    for n, call, seconds, flops in rows:
        kernel = f"{call.weight_shape[-1]}{'T' if call.func is torch.conv_transpose2d else ''}"
        print(f"{n:>5}  {str(call.input_shape):<20}{out_channels(call):>5}{kernel:>3}{call.stride:>3} | "
              f"{seconds * 1e3:>8.2f}{flops / seconds / 1e9:>9.0f}{100 * flops / seconds / peak:>7.0f}%")
    print(f"convolutions alone: {conv_total * 1e3:.0f} ms a step, {conv_flops / conv_total / 1e9:.0f} GFLOP/s "
          f"({100 * conv_flops / conv_total / peak:.0f}% of peak), {100 * conv_flops / flops_of_step:.0f}% of the FLOPs")
    print(f"the full step:      {step_s * 1e3:.0f} ms, {flops_of_step / step_s / 1e9:.0f} GFLOP/s "
          f"({100 * flops_of_step / step_s / peak:.0f}% of peak); convolutions are {100 * conv_total / step_s:.0f}% of it")
    print(f"ceiling with everything but convolutions free: {100 * flops_of_step / conv_total / peak:.0f}% of peak")
    if args.in_situ:
        in_situ(args.preset, args.batch, args.precision)


if __name__ == "__main__":
    main()
