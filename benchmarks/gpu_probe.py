"""Where a training step's time goes on a GPU, and which form of the step is fastest (issue 41).

One process times `diffuse train`'s step (`ddpm-cifar10`, 32x32, batch 256, bf16 by default) in each variant below,
diffusers' UNet2DModel step beside them, then profiles one eager step of each and prints its kernels grouped as
convolution, norm, elementwise, attention, copies and optimizer. Variants combine with '+' (layout+benchmark).

  default           the step `diffuse train` takes: channels_last on CUDA, replayed as one CUDA graph
  eager             the same without the CUDA graph (what launching every kernel costs)
  layout            the other memory format (contiguous on CUDA)
  benchmark         torch.backends.cudnn.benchmark on: cuDNN times its algorithms for each shape first
  compile           torch.compile of the whole network, the CUDA graph kept around the compiled step
  fused-norm        each GroupNorm (and the SiLU after it) compiled alone: one kernel, no layout copies
  textbook-upsample nearest-neighbour enlargement, then the 3x3 convolution (ours: one transposed convolution)
  no-attention-copy q, k and v left as strided views of the qkv convolution (SDPA may then take its math path)

    python benchmarks/gpu_probe.py                       # on a GPU: under 5 minutes on an H200
    python benchmarks/gpu_probe.py --check               # every variant's outputs and gradients against default
    python benchmarks/gpu_probe.py --check --preset tiny --device cpu   # the same check in seconds, on the CPU
    python benchmarks/gpu_probe.py --variants default layout+benchmark --no-profile

--check runs one fp32 step of each variant (TF32 off, dropout off, random weights) at batch 2 and compares the
network's output and every gradient to the default's; it exits 1 if any differs by more than 1e-4 of the largest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import synchronizer, timed, train_step_fn  # noqa: E402
from forms import CHANGES as FORMS  # noqa: E402
from train_speed import WARMUP_STEPS, contestant  # noqa: E402

from diffuse_cli.network import fast_ops, unet  # noqa: E402
from diffuse_cli.network.device import memory_format  # noqa: E402

CHANGES = ("eager", "layout", "benchmark", "compile", "fused-norm", "textbook-upsample", "no-attention-copy")
DEFAULT_VARIANTS = ["default", *CHANGES, "layout+benchmark"]

# Kernel and operator names -> the group they are counted in, first match wins. GPU kernels are named by their
# libraries (cuDNN's and CUTLASS's convolutions, torch's elementwise templates, Triton's fused kernels), CPU
# operators by aten; both are covered.
GROUPS = [
    ("optimizer", r"adam|multi_tensor|foreach|lerp|clip_grad|vector_norm|_amp_"),  # the clip's norms too
    ("attention", r"flash|fmha|attention|sdpa|softmax|bmm|baddbmm"),
    ("norm", r"group_?norm|groupnorm|welford|moments|fusedparams|internalgradients|gammabeta|native_group"
             r"|red_fused.*norm|per_fused.*norm"),  # torch's CUDA GroupNorm kernels, then inductor's
    ("copies", r"copy|contiguous|nchwtonhwc|nhwctonchw|transpose|memcpy|memset|cat|upsample|interpolate|pad"),
    ("convolution", r"conv|cudnn|xmma|implicit|gemm|cutlass|wgrad|dgrad|sm\d\d_|addmm|\bmm\b|linear|winograd|mkldnn"),
    ("elementwise", r"elementwise|silu|add|mul|sub|div|where|fill|dropout|bernoulli|uniform|triton_|reduce|sum|mean"
                    r"|pow|sqrt|exp|sin|cos|neg|square|clamp|mse"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, lowered)), "other")


def parse_variant(spec: str) -> frozenset[str]:
    parts = frozenset(p for p in spec.split("+") if p != "default")
    unknown = parts - set(CHANGES)
    if unknown:
        raise SystemExit(f"error: unknown variant {'+'.join(sorted(unknown))}; choose from default, {', '.join(CHANGES)}")
    return parts


def group_norm_silu(x, weight, bias, groups: int, eps: float):
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def group_norm(x, weight, bias, groups: int, eps: float):
    return F.group_norm(x, groups, weight, bias, eps)


@functools.cache
def compiled(fn):
    """fn compiled once a process, whichever variants use it: one compilation for each shape it meets."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(fn, dynamic=False)


def fused_norm_forwards(model: torch.nn.Module) -> None:
    """Route every GroupNorm (with the SiLU after it, where one follows) through a compiled function, so that
    inductor writes the norm, its affine and the SiLU as one kernel that reads either memory format."""
    norm_silu, norm = compiled(group_norm_silu), compiled(group_norm)

    def call(fn, gn):
        return lambda x: fn(x, gn.weight, gn.bias, gn.num_groups, gn.eps)

    for module in model.modules():
        if isinstance(module, unet.ResBlock):
            def forward(x, emb, b=module):
                h = b.conv1(call(norm_silu, b.norm1)(x))
                h = h + b.emb(F.silu(emb))[:, :, None, None]
                return b.skip(x) + b.conv2(b.dropout(call(norm_silu, b.norm2)(h)))
            module.forward = forward
        elif isinstance(module, unet.Attention):
            module.norm.forward = call(norm, module.norm)
    out = model.out  # GroupNorm, SiLU, conv
    out[0].forward, out[1].forward = call(norm_silu, out[0]), (lambda x: x)


def build(changes: frozenset[str], preset: str, batch: int, precision: str, dev: torch.device):
    """(model, net, x0, t, eps) for a variant: ours as train_speed builds it, then the variant's changes."""
    model, net, x0, t, eps, _ = contestant("ours", preset, batch, precision, dev, our_runtime=True)
    if "layout" in changes:
        other = torch.contiguous_format if memory_format(dev, precision) == torch.channels_last else torch.channels_last
        model.to(memory_format=other)
        x0, eps = x0.contiguous(memory_format=other), eps.contiguous(memory_format=other)
    if "textbook-upsample" in changes:  # forms.py's other form of the upsampling
        kind, other_forward, _ = FORMS["upsampling"]
        for module in model.modules():
            if isinstance(module, kind):
                module.forward = other_forward(module)
    if "fused-norm" in changes:
        fused_norm_forwards(model)
    if "compile" in changes:
        net = torch.compile(model)
    return model, net, x0, t, eps


@contextlib.contextmanager
def switches(changes: frozenset[str]):
    """The process-wide settings a variant changes, put back after it."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "benchmark" in changes
    patch = (mock.patch.object(fast_ops, "fused_attention_layout", lambda qkv: False)
             if "no-attention-copy" in changes else contextlib.nullcontext())
    try:
        with patch:
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def time_variant(spec: str, args, dev: torch.device) -> float:
    """Images/s of the variant's training step in the steady state."""
    changes = parse_variant(spec)
    with switches(changes):
        model, net, x0, t, eps = build(changes, args.preset, args.batch, args.precision, dev)
        fell_back = []
        step = train_step_fn(model, net, x0, t, eps, args.precision, cuda_graph="eager" not in changes,
                             on_fallback=fell_back.append)
        start = time.perf_counter()
        step()  # the first call compiles, tunes and warms up: reported apart from the speed
        synchronizer(dev)()
        first = time.perf_counter() - start
        seconds = timed(step, repeats=args.repeats, warmup=WARMUP_STEPS, block=args.block, sync=synchronizer(dev))
    print(f"  {spec:<28}{args.batch / seconds:>10.0f} img/s{1e3 * seconds:>9.1f} ms/step   (first step {first:.1f} s)"
          + (f"; no CUDA graph: its capture failed ({fell_back[0]})" if fell_back else ""), flush=True)
    return args.batch / seconds


def time_diffusers(args, dev: torch.device) -> float | None:
    try:
        model, net, x0, t, eps, optimizer = contestant("diffusers", args.preset, args.batch, args.precision, dev,
                                                       our_runtime=False)
    except ImportError:
        print("  diffusers is not installed (pip install -e '.[bench]'): its step is not timed")
        return None
    step = train_step_fn(model, net, x0, t, eps, args.precision, optimizer)
    seconds = timed(step, repeats=args.repeats, warmup=WARMUP_STEPS, block=args.block, sync=synchronizer(dev))
    print(f"  {'diffusers (as shipped)':<28}{args.batch / seconds:>10.0f} img/s{1e3 * seconds:>9.1f} ms/step", flush=True)
    return args.batch / seconds


def kernel_times(step, dev: torch.device, steps: int = 3) -> dict[str, float]:
    """Seconds a step spends in each kernel (on a GPU) or operator (on the CPU), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    synchronizer(dev)()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronizer(dev)()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if dev.type == "cuda":
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            kind = getattr(event, "device_type", None)
            if (kind != torch.autograd.DeviceType.CUDA if kind is not None
                    else event.key.startswith(("aten::", "cuda")) or not us):
                continue  # an operator or a runtime call: its kernels are counted themselves
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        times[event.key] += us / 1e6 / steps
    return times


def profile_table(args, dev: torch.device) -> None:
    """The top kernels of our eager step and diffusers', and every group's total, in ms a step."""
    tables = {}
    with switches(frozenset()):
        model, net, x0, t, eps = build(frozenset(), args.preset, args.batch, args.precision, dev)
        tables["ours"] = kernel_times(train_step_fn(model, net, x0, t, eps, args.precision, cuda_graph=False), dev)
        del model, net
    try:
        model, net, x0, t, eps, optimizer = contestant("diffusers", args.preset, args.batch, args.precision, dev,
                                                       our_runtime=False)
        tables["diffusers"] = kernel_times(train_step_fn(model, net, x0, t, eps, args.precision, optimizer), dev)
    except ImportError:
        pass
    unit = "kernels" if dev.type == "cuda" else "aten operators (self time)"
    for name, times in tables.items():
        total = sum(times.values())
        print(f"\n{name}: top {args.top} {unit}, ms a step (of {1e3 * total:.1f})")
        for key, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {1e3 * seconds:>8.2f} {100 * seconds / total:>5.1f}%  {group_of(key):<12} {key[:90]}")
    groups = {name: defaultdict(float) for name in tables}
    for name, times in tables.items():
        for key, seconds in times.items():
            groups[name][group_of(key)] += seconds
    print(f"\n{'group, ms a step':<18}" + "".join(f"{name:>12}" for name in tables))
    for group in [g for g, _ in GROUPS] + ["other"]:
        print(f"  {group:<16}" + "".join(f"{1e3 * groups[name][group]:>12.2f}" for name in tables))
    print(f"  {'total':<16}" + "".join(f"{1e3 * sum(groups[name].values()):>12.2f}" for name in tables))


def outputs_and_grads(changes: frozenset[str], args, dev: torch.device) -> dict[str, torch.Tensor]:
    """The network's output for fixed inputs and every parameter's gradient of the step's loss, in fp32."""
    with switches(changes):
        model, net, x0, t, eps = build(changes, args.preset, 2, "fp32", dev)
        randomise(model)
        for module in model.modules():  # dropout off: each layout, and compiled code, draws its masks differently
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        x = x0 + eps  # any input will do; the same in every variant (same seed)
        out = net(x, t)
        out.float().square().mean().backward()
    result = {"output": out.detach().float()}
    result.update({name: p.grad.float() for name, p in model.named_parameters()})
    return result


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Every weight random and the same in every variant (a fresh U-Net's zero-initialised output layer would
    make every output and gradient zero, and every variant agree): N(0, 1/fan_in) for matrices and kernels,
    N(0, 0.1) for biases, 1 + N(0, 0.1) for the norms' scales."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            draw = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(draw / p[0].numel() ** 0.5)
            else:
                p.copy_(draw * 0.1 + (1.0 if isinstance(module, torch.nn.GroupNorm) and name == "weight" else 0.0))


def check(args, dev: torch.device) -> int:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as fp32
    reference = outputs_and_grads(frozenset(), args, dev)
    assert all(v.abs().max() > 0 for v in reference.values()), "an output or gradient is zero: nothing to compare"
    worst_all = 0.0
    for spec in args.variants:
        if spec == "default":
            continue
        got = outputs_and_grads(parse_variant(spec), args, dev)
        worst, where = max(((got[k] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12), k)
                           for k, ref in reference.items())
        worst_all = max(worst_all, worst)
        print(f"  {spec:<28} largest difference {worst:.1e} of the largest value ({where})"
              f"{'' if worst <= 1e-4 else '   DIFFERS'}", flush=True)
    return 0 if worst_all <= 1e-4 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of steps; the median is reported")
    parser.add_argument("--block", type=int, default=None, help="steps a timed block (default: 10 on a GPU, 1 else)")
    parser.add_argument("--top", type=int, default=15, help="kernels listed for each tool")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare outputs and gradients instead of timing")
    args = parser.parse_args()
    dev = torch.device(args.device)
    args.block = args.block or (10 if dev.type == "cuda" else 1)
    for spec in args.variants:
        parse_variant(spec)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.preset}, 32x32, "
          + ("batch 2, fp32: each variant against default" if args.check else f"batch {args.batch}, {args.precision}"),
          flush=True)
    if args.check:
        sys.exit(check(args, dev))
    for spec in args.variants:
        try:
            time_variant(spec, args, dev)
        except Exception as e:  # noqa: BLE001 -- a variant that cannot run here is reported, and the rest go on
            print(f"  {spec:<28} failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    time_diffusers(args, dev)
    if not args.no_profile:
        profile_table(args, dev)


if __name__ == "__main__":
    main()
