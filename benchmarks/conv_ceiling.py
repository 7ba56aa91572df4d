"""How close to the practical peak can a training step of a preset get? An upper bound.

Records every convolution of one forward pass (input shape, output channels, kernel, stride),
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
step but the convolutions cost nothing.

    python benchmarks/conv_ceiling.py                       # small, batch 16, bf16
    python benchmarks/conv_ceiling.py --preset ddpm-cifar10 --batch 64 --precision fp32
    python benchmarks/conv_ceiling.py --in-situ             # needs diffusers (pip install -e '.[bench]')
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import step_flops, timed, train_step_fn  # noqa: E402
from train_speed import WARMUP_STEPS, contestant, practical_peak  # noqa: E402

from diffuse_cli.config import model_config  # noqa: E402
from diffuse_cli.device import autocast, keep_cpu_memory, memory_format  # noqa: E402
from diffuse_cli.unet import UNet  # noqa: E402

ConvCall = collections.namedtuple("ConvCall", "input_shape out_channels kernel stride")


def conv_calls(model: UNet, x: torch.Tensor, t: torch.Tensor, precision: str) -> collections.Counter:
    """How many times one forward pass calls each distinct convolution."""
    calls: collections.Counter = collections.Counter()

    def record(conv, args):
        calls[ConvCall(tuple(args[0].shape), conv.out_channels, conv.kernel_size[0], conv.stride[0])] += 1
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad(), autocast(precision, x.device):
        model(x, t)
    for hook in hooks:
        hook.remove()
    return calls


def conv_seconds(call: ConvCall, fmt: torch.memory_format, precision: str, dev: torch.device,
                 input_grad: bool) -> float:
    """Median seconds of one convolution's forward and backward, alone."""
    cin = call.input_shape[1]
    dtype = torch.bfloat16 if precision == "bf16" and input_grad else torch.float32  # inputs arrive as autocast left them
    x = torch.randn(call.input_shape, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(input_grad)
    w = torch.randn(call.out_channels, cin, call.kernel, call.kernel, device=dev, requires_grad=True)
    w = w.detach().contiguous(memory_format=fmt).requires_grad_()
    b = torch.zeros(call.out_channels, device=dev, requires_grad=True)
    with autocast(precision, dev):
        grad = torch.randn_like(F.conv2d(x, w, b, call.stride, call.kernel // 2))

    def run() -> None:
        with autocast(precision, dev):
            y = F.conv2d(x, w, b, call.stride, call.kernel // 2)
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


class LayerClock:
    """Adds up the seconds one kind of layer takes, forward and backward, inside real steps.

    On the CPU every kernel runs synchronously, so wall-clock time around a layer is its cost.
    The autograd engine runs a layer's backward right after its output's gradient is ready; the
    marks only add timing calls (the step is timed again without them)."""

    def __init__(self, model: torch.nn.Module, kind: type):
        self.on, self.seconds, self._started = False, 0.0, 0.0
        for layer in (m for m in model.modules() if isinstance(m, kind)):
            layer.forward = self._timed(layer.forward)

    def _timed(self, forward):
        def run(x):
            if not self.on:
                return forward(x)
            x = _Mark.apply(x, self, "input")
            start = time.perf_counter()
            y = forward(x)
            self.seconds += time.perf_counter() - start
            return _Mark.apply(y, self, "output")
        return run

    def backward_mark(self, edge: str) -> None:
        now = time.perf_counter()
        if edge == "output":
            self._started = now
        else:
            self.seconds += now - self._started


CLOCKED = {"convolutions": torch.nn.Conv2d, "GroupNorm": torch.nn.GroupNorm, "linear": torch.nn.Linear}


def in_situ(preset: str, batch: int, precision: str, rounds: int = 15) -> None:
    """Time both steps plainly and with their layers clocked, alternating; print medians.
    The rest is what the clocks do not cover: activations, attention's matmuls and softmax,
    autocast's casts, the loss, the optimizer and EMA, Python."""
    runs = {}
    for impl in ("ours", "diffusers"):
        model, net, x0, t, eps, optimizer = contestant(impl, preset, batch, precision, torch.device("cpu"),
                                                       our_runtime=impl == "ours")
        clocks = {name: LayerClock(model, kind) for name, kind in CLOCKED.items()}
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
        h = call.input_shape[2] // call.stride
        flops = (2 if first else 3) * 2 * call.input_shape[0] * call.out_channels * h * h \
            * call.input_shape[1] * call.kernel ** 2
        rows.append((n, call, seconds, flops))
        conv_total, conv_flops = conv_total + n * seconds, conv_flops + n * flops
    step = train_step_fn(model, model, x0, t, eps, args.precision)
    step_s = timed(step, repeats=7, warmup=8)
    peak = max(peak, practical_peak(args.precision, dev) * 1e9)  # this machine's speed drifts; the larger counts

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}, batch {args.batch}, "
          f"{args.precision}, {fmt}; practical peak {peak / 1e9:.0f} GFLOP/s (the larger of two measurements)")
    print(f"{'calls':>5}  {'input':<20}{'out':>5}{'k':>3}{'s':>3} | {'ms each':>8}{'GFLOP/s':>9}{'% peak':>8}")
    for n, call, seconds, flops in rows:
        print(f"{n:>5}  {str(call.input_shape):<20}{call.out_channels:>5}{call.kernel:>3}{call.stride:>3} | "
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
