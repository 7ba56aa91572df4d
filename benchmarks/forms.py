"""Our upsampling against the textbook one, inside whole training steps.

The U-Net upsamples by a nearest-neighbour 2x enlargement and a 3x3 convolution. `diffuse`
computes the two as one stride-2 transposed convolution of the unenlarged input
(`unet.upsample_conv`: the same function, 16/36 of the FLOPs). This trains two copies of a
preset side by side, one with each form, alternating their steps in one process (this machine's
speed drifts by 10-20% over minutes, which alternation cancels), and prints the median step time
of each and their ratio. Both take `diffuse train`'s step (on a GPU, replayed as a CUDA graph).

    python benchmarks/upsampling.py                             # small and ddpm-cifar10, batch 16 and 64, fp32 and bf16
    python benchmarks/upsampling.py --presets small --batches 16 --precisions bf16
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import grid_parser, synchronizer, train_step_fn, upsample_then_conv  # noqa: E402
from train_speed import WARMUP_STEPS, contestant  # noqa: E402

from diffuse_cli import unet  # noqa: E402
from diffuse_cli.device import keep_cpu_memory  # noqa: E402


FORMS = {"textbook": upsample_then_conv, "ours": unet.upsample_conv}


def with_upsampling(model: torch.nn.Module, form) -> None:
    """Make every Upsample of this model (only) compute with `form`, from its own parameters."""
    for module in model.modules():
        if isinstance(module, unet.Upsample):
            module.forward = lambda x, emb=None, m=module: form(x, m.conv.weight, m.conv.bias)


def compare(preset: str, batch: int, precision: str, dev: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds of a training step with each form, alternating."""
    steps = {}
    for name, form in FORMS.items():
        model, net, x0, t, eps, _ = contestant("ours", preset, batch, precision, dev, our_runtime=True)
        with_upsampling(model, form)
        steps[name] = train_step_fn(model, net, x0, t, eps, precision)
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
    parser.add_argument("--rounds", type=int, default=None,
                        help="steps of each form (default: 15, 6 for ddpm-cifar10 on the CPU)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        keep_cpu_memory()
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads; median step, ms")
    print(f"{'preset':<14}{'batch':>6}{'prec':>6} | {'textbook':>9}{'ours':>9}{'speed-up':>10}")
    for preset in args.presets:
        for batch in args.batches:
            for precision in args.precisions:
                slow = preset == "ddpm-cifar10" and dev.type == "cpu"
                ms = {k: v * 1e3 for k, v in compare(preset, batch, precision, dev,
                                                     args.rounds or (6 if slow else 15)).items()}
                print(f"{preset:<14}{batch:>6}{precision:>6} | {ms['textbook']:>9.1f}{ms['ours']:>9.1f}"
                      f"{ms['textbook'] / ms['ours']:>9.3f}x", flush=True)


if __name__ == "__main__":
    main()
