"""Where Winograd's F(4x4, 3x3) pays, layer by layer: oneDNN's 3x3 convolution against ours (winograd.py).

For each side and pair of channel counts, one 3x3 convolution of a batch, timed two ways and alternating (this
machine's speed drifts over minutes, which alternation cancels): with a backward, as a training step runs it
(forward, then the input's and the weight's gradients), and without, as sampling runs it (forward only, the
filters' transform kept, as a sampling network keeps it). Prints oneDNN's time over ours and whether
`fast_ops.winograd_pays` takes Winograd there, so a rule that leaves time on the table, or takes a loss, shows as
a ratio above 1.1 marked "no" or one below 0.9 marked "yes".

    python benchmarks/winograd_layers.py                     # batch 16, sides 32 to 4
    python benchmarks/winograd_layers.py --isa avx2          # an AVX-512 machine as AVX2 runs
    python benchmarks/winograd_layers.py --batch 64 --sides 16 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import ISA_ENVIRONMENTS, machine_line, with_isa  # noqa: E402

from diffuse_cli.network import fast_ops, winograd  # noqa: E402
from diffuse_cli.network.fast_ops import keep_cpu_memory  # noqa: E402

# (in, out): equal widths, the doublings and halvings of a U-Net's levels, its skip concatenations, the image's
CHANNELS = [(16, 16), (32, 32), (48, 48), (64, 64), (96, 96), (128, 128), (256, 256), (48, 96), (96, 48),
            (144, 48), (512, 256), (3, 48), (48, 3)]


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Each function's median time in ms, called in turn `rounds` times after one call to warm up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def layer(batch: int, c_in: int, c_out: int, side: int, rounds: int) -> dict[str, tuple[float, float, bool]]:
    """'train' and 'sample' -> (oneDNN ms, Winograd ms, whether winograd_pays takes Winograd)."""
    x = torch.randn(batch, c_in, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(c_out, c_in, 3, 3) / (3 * c_in**0.5)).requires_grad_()
    dy = torch.randn(batch, c_out, side, side).contiguous(memory_format=torch.channels_last)
    filters = winograd.transform_filter(weight.detach())
    train = median_ms({"onednn": lambda: F.conv2d(x, weight, None, padding=1).backward(dy),
                       "winograd": lambda: winograd.conv3x3(x, weight, None).backward(dy)}, rounds)
    with torch.no_grad():
        frozen, still = x.detach(), weight.detach()
        sample = median_ms({"onednn": lambda: F.conv2d(frozen, still, None, padding=1),
                            "winograd": lambda: winograd.conv3x3(frozen, still, None, filters)}, rounds)
        sample_pays = fast_ops.winograd_pays(frozen, still)
    train_pays = fast_ops.winograd_pays(x, weight)
    return {"train": (train["onednn"], train["winograd"], train_pays),
            "sample": (sample["onednn"], sample["winograd"], sample_pays)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 16, 8, 4])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each form")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS), help="cap torch's kernels at this ISA")
    args = parser.parse_args()
    with_isa(args.isa)
    keep_cpu_memory()
    torch.manual_seed(0)
    print(machine_line("cpu") + f"; batch {args.batch}, fp32; ms, oneDNN / Winograd, and the rule's choice")
    print(f"{'in':>4}{'out':>5}{'side':>5} | {'train: oneDNN':>13}{'Winograd':>9}{'ratio':>7}{'taken':>6} |"
          f" {'sample: oneDNN':>14}{'Winograd':>9}{'ratio':>7}{'taken':>6}")
    for side in args.sides:
        for c_in, c_out in CHANNELS:
            row = layer(args.batch, c_in, c_out, side, args.rounds)
            cells = [f"{a:>{w}.1f}{b:>9.1f}{a / b:>6.2f}x{'yes' if taken else 'no':>6}"
                     for (a, b, taken), w in ((row["train"], 13), (row["sample"], 14))]
            print(f"{c_in:>4}{c_out:>5}{side:>5} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
