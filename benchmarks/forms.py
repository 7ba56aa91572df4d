"""Our forms of the network's computations against torch's or the textbook's, inside whole training steps.

- `upsampling`: the U-Net upsamples by a nearest-neighbour 2x enlargement and a 3x3 convolution.
  `diffuse` computes the two as one stride-2 transposed convolution of the unenlarged input
  (`fast_ops.upsample_conv`: the same function, 16/36 of the FLOPs); the textbook form enlarges, then
  convolves.
- `dropout`: torch's CPU dropout draws one Bernoulli variable an element; `fast_ops.dropout` takes
  four 16-bit uniforms from each 64-bit draw (the same distribution, up to p rounded to 16 bits).
  Only presets with dropout (`ddpm-cifar10`, `base`) have any; on a GPU both are F.dropout.
- `winograd`: the residual blocks' 3x3 convolutions by Winograd's F(4x4, 3x3) in matrix products
  (`fast_ops.conv3x3`, where `winograd_pays`: on a CPU without AVX-512, in fp32, where the layer's channels
  and side make it pay) against oneDNN's direct convolutions (F.conv2d) everywhere.
- `transforms`: Winograd's tile transforms as numba's one-pass kernels (`winograd_kernels.py`, and the rule
  that follows them) against the same transforms in torch's matrix products (`winograd.KERNELS = False`, and
  its rule); on a CPU where neither takes Winograd the two are the same step.
- `norm`: GroupNorm (and the SiLU after it) on channels_last images by numba's two passes (`norm_kernels.py`,
  where `fast_ops.norm_pays`: float32 on the CPU) against torch's GroupNorm and SiLU (`fast_ops.NORM_KERNELS =
  False`).
- `enlarged`: in training, where Winograd pays, the upsampling as the enlargement convolved by `fast_ops.conv3x3`
  (`fast_ops.upsample_conv`) against the transposed convolution everywhere (`fast_ops.ENLARGE = False`); sampling
  keeps the transposed convolution either way.
- `fusions`: the residual block with its SiLUs inside numba's GroupNorm pass and, outside autograd, the
  embedding's shift and the residual added in Winograd's output transform (`unet.ResBlock`), against the same
  kernels with torch's SiLU and additions each a pass of its own.

This trains two copies of a preset side by side, one with each form, alternating their steps in
one process (this machine's speed drifts by 10-20% over minutes, which alternation cancels), and
prints the median step time of each and their ratio. Both take `diffuse train`'s step (on a GPU,
replayed as a CUDA graph). `--sampling` times a sampling call instead: the network's forward without
gradients, in eval mode, the filters kept.

    python benchmarks/forms.py                                  # upsampling: small and ddpm-cifar10, batch 16 and 64, fp32 and bf16
    python benchmarks/forms.py --presets small --batches 16 --precisions bf16
    python benchmarks/forms.py --change dropout --presets ddpm-cifar10 --batches 16
    python benchmarks/forms.py --change winograd --batches 16 --isa avx2   # an AVX-512 machine, as AVX2 runs
    python benchmarks/forms.py --change transforms --presets small ddpm-cifar10 --batches 16 --precisions fp32
    python benchmarks/forms.py --change norm --presets small ddpm-cifar10 --batches 16 --precisions fp32
    python benchmarks/forms.py --change enlarged --presets small ddpm-cifar10 --batches 16 --precisions fp32
    python benchmarks/forms.py --change fusions --sampling --presets small --batches 16 --precisions fp32 --rounds 80
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import grid_parser, machine_line, parse_grid, synchronizer, train_step_fn, upsample_then_conv  # noqa: E402
from train_speed import WARMUP_STEPS, contestant  # noqa: E402

from diffuse_cli.network import fast_ops, unet, winograd  # noqa: E402
from diffuse_cli.presets import model_config  # noqa: E402
from diffuse_cli.network.fast_ops import keep_cpu_memory  # noqa: E402


# change -> (the modules it is in, their forward in the other form, that form's name)
CHANGES = {
    "upsampling": (unet.Upsample, lambda m: lambda x, emb=None: upsample_then_conv(x, m.conv.weight, m.conv.bias),
                   "textbook"),
    "dropout": (unet.Dropout, lambda m: lambda x: F.dropout(x, m.p, m.training), "torch"),
    "winograd": (unet.Conv3x3, lambda m: lambda x: F.conv2d(x, m.weight, m.bias, padding=1), "oneDNN"),
    "transforms": (None, None, "torch"),  # a switch of the whole step, forward and backward: switched() below
    "norm": (None, None, "torch"),
    "enlarged": (None, None, "transposed"),
    "fusions": (unet.ResBlock, lambda m: lambda x, emb: unfused_block(m, x, emb), "unfused"),
}

# change -> (the module, its switch, the other form's setting): global switches, read in the backward too
SWITCHES = {"transforms": (winograd, "KERNELS", False), "norm": (fast_ops, "NORM_KERNELS", False),
            "enlarged": (fast_ops, "ENLARGE", False)}


def unfused_block(block: unet.ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """unet.ResBlock's forward with its SiLUs, the embedding's shift and the residual each a pass of its own (the
    SiLUs in place where no gradient is taken; autograd forbids it on the norm's output view)."""
    inplace = not torch.is_grad_enabled()
    h = block.conv1(F.silu(block.norm1(x), inplace=inplace))
    h = h + block.emb(F.silu(emb))[:, :, None, None]
    h = block.conv2(block.dropout(F.silu(block.norm2(h), inplace=inplace)))
    return block.skip(x) + h


def sampling_call_fn(model, net, x0: torch.Tensor, t: torch.Tensor):
    """One sampling call: the network's forward without gradients, in eval mode."""
    model.eval()

    def call() -> None:
        with torch.no_grad():
            net(x0, t)
    return call


def switched(change: str, name: str, step):
    """The step as the form `name` runs it, where a change is a global switch rather than a module's forward."""
    if change not in SWITCHES:
        return step
    module, switch, other = SWITCHES[change]

    def run() -> None:
        setattr(module, switch, other if name != "ours" else None)
        try:
            step()
        finally:
            setattr(module, switch, None)
    return run


def compare(change: str, preset: str, batch: int, precision: str, dev: torch.device, rounds: int,
            sampling: bool = False) -> dict[str, float]:
    """Median seconds of a training step (a sampling call where `sampling`) in the other form and in ours,
    alternating."""
    kind, other_forward, other = CHANGES[change]
    steps = {}
    for name in (other, "ours"):
        model, net, x0, t, eps, _ = contestant("ours", preset, batch, precision, dev, our_runtime=True)
        if name == other and kind is not None:
            for module in model.modules():
                if isinstance(module, kind):
                    module.forward = other_forward(module)
        step = sampling_call_fn(model, net, x0, t) if sampling else train_step_fn(model, net, x0, t, eps, precision)
        steps[name] = switched(change, name, step)
        for _ in range(WARMUP_STEPS):
            steps[name]()
    sync = synchronizer(dev)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = grid_parser(__doc__)
    parser.add_argument("--change", choices=list(CHANGES), default="upsampling")
    parser.add_argument("--rounds", type=int, default=None,
                        help="steps of each form (default: 15, 6 for ddpm-cifar10 on the CPU)")
    parser.add_argument("--sampling", action="store_true",
                        help="time a sampling call (the forward without gradients) instead of a training step")
    args = parse_grid(parser)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        keep_cpu_memory()
    other = CHANGES[args.change][2]
    what = "sampling call" if args.sampling else "step"
    print(f"{machine_line(args.device)}\n{args.change}: median {what}, ms")
    print(f"{'preset':<14}{'batch':>6}{'prec':>6} | {other:>9}{'ours':>9}{'speed-up':>10}")
    for preset in args.presets:
        if args.change == "dropout" and model_config(preset).dropout == 0:
            print(f"{preset:<14} has no dropout: skipped")
            continue
        for batch in args.batches:
            for precision in args.precisions:
                slow = preset == "ddpm-cifar10" and dev.type == "cpu"
                ms = {k: v * 1e3 for k, v in compare(args.change, preset, batch, precision, dev,
                                                     args.rounds or (6 if slow else 15), args.sampling).items()}
                print(f"{preset:<14}{batch:>6}{precision:>6} | {ms[other]:>9.1f}{ms['ours']:>9.1f}"
                      f"{ms[other] / ms['ours']:>9.3f}x", flush=True)


if __name__ == "__main__":
    main()
