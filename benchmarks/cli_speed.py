"""The whole `diffuse train` command's step against the benchmark's in-process step and diffusers' plain step.

`diffuse train` runs on a folder of 24 images twice, for --steps A and B (13 and 3 by default); the difference of
the two commands' wall times over A - B steps is what a step costs inside the command, with everything the
command does each step (reading the batch from the image cache a step ahead, drawing t and the noise, the
thread count, post-hoc EMA, logging, the progress bar). The folder is read as a user's is, through the image
cache (in a temporary folder), so the read-ahead thread runs beside the steps. Both commands set up, save and
draw their last grid once, so those cancel. Beside it, in fresh processes, `train_speed.py`'s in-process step
of ours and diffusers' plain eager step (torch's AdamW, as its training script runs), at the same preset,
batch, image size and precision. Rounds alternate the three; medians are printed.

A long step (`ddpm-cifar10`, a second or more here) hides a per-step cost of a few tens of milliseconds that
the short steps of a small network at 16 px do not: the second command below is the README's run's step.

    pip install -e '.[bench]'
    python benchmarks/cli_speed.py                                    # ddpm-cifar10, batch 16, 32 px, fp32 and auto
    python benchmarks/cli_speed.py --preset small --image-size 16 --batch 32 --precisions fp32 --steps 203 3
    python benchmarks/cli_speed.py --isa avx2                         # an AVX-512/AMX machine as AVX2 runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ISA_ENVIRONMENTS, machine_line, with_isa  # noqa: E402
from train_speed import in_fresh_process  # noqa: E402

from diffuse_cli.images.pictures import save_png  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402
from diffuse_cli.network.device import resolve_precision  # noqa: E402


def command_seconds(data: Path, out: Path, preset: str, batch: int, size: int, precision: str, steps: int) -> float:
    """Wall seconds of `diffuse train` for `steps` steps, from the start of its process to its end; the image cache
    sits beside `data`."""
    command = [sys.executable, "-m", "diffuse_cli", "train", str(data), "--model", preset, "--image-size", str(size),
               "--batch-size", str(batch), "--precision", precision, "--steps", str(steps), "--out", str(out),
               "--cache-dir", str(data.parent / "cache"), "--hflip", "on"]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"diffuse train failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--steps", nargs=2, type=int, default=[13, 3], metavar=("A", "B"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS))
    args = parser.parse_args()
    with_isa(args.isa)
    print(machine_line("cpu") + f"; {args.preset}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, the command's steps {args.steps[0]} "
          f"minus {args.steps[1]}", flush=True)
    many, few = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        for i, image in enumerate(render_shapes(24, args.image_size, seed=0)):
            save_png(image, data / f"{i:02d}.png")
        for asked in args.precisions:
            precision = resolve_precision(asked, torch.device("cpu"))
            cli, ours, theirs = [], [], []
            shape = args.preset, args.batch, args.image_size, asked
            for r in range(args.rounds):
                cli.append((command_seconds(data, Path(tmp) / f"a{r}{asked}", *shape, many)
                            - command_seconds(data, Path(tmp) / f"b{r}{asked}", *shape, few)) / (many - few))
                for impl, runs in (("ours", ours), ("diffusers", theirs)):
                    result = in_fresh_process(impl, args.preset, args.batch, precision if impl == "ours" else "fp32",
                                              "cpu", False, impl == "ours", True, args.image_size, timeout=3600)
                    if "failed" in result:
                        raise SystemExit(f"{impl}'s in-process step failed: {result['failed']}")
                    runs.append(args.batch / result["images_per_s"])
            step, inside, plain = (statistics.median(x) for x in (cli, ours, theirs))
            print(f"--precision {asked} ({precision}): the command {args.batch / step:.2f} img/s ({step:.2f} s a step), "
                  f"in-process {args.batch / inside:.2f} img/s, diffusers' plain step (fp32) "
                  f"{args.batch / plain:.2f} img/s | command / in-process {inside / step:.3f}, "
                  f"command / diffusers {plain / step:.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DIFFUSE_DEVICE", "cpu")
    main()
