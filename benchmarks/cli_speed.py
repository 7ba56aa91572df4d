"""The whole `diffuse train` command's step against the benchmark's in-process step and diffusers' plain step.

`diffuse train` runs on a folder of 24 images twice, for --steps A and B (13 and 3 by default); the difference of
the two commands' wall times over B - A steps is what a step costs inside the command, with everything the
command does each step (reading the images, drawing t and the noise, the thread count, logging, the progress
bar). Both commands set up, save and draw their last grid once, so those cancel. Beside it, in fresh processes,
`train_speed.py`'s in-process step of ours and diffusers' plain eager step (torch's AdamW, as its training
script runs), at the same preset, batch and precision. Rounds alternate the three; medians are printed.

    pip install -e '.[bench]'
    python benchmarks/cli_speed.py                                    # ddpm-cifar10, batch 16, fp32 and auto
    python benchmarks/cli_speed.py --preset small --rounds 3
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


def command_seconds(data: Path, out: Path, preset: str, batch: int, precision: str, steps: int) -> float:
    """Wall seconds of `diffuse train` for `steps` steps, from the start of its process to its end."""
    command = [sys.executable, "-m", "diffuse_cli", "train", str(data), "--model", preset, "--image-size", "32",
               "--batch-size", str(batch), "--precision", precision, "--steps", str(steps), "--out", str(out),
               "--no-cache", "--hflip", "on"]
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
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--steps", nargs=2, type=int, default=[13, 3], metavar=("A", "B"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS))
    args = parser.parse_args()
    with_isa(args.isa)
    print(machine_line("cpu") + f"; {args.preset}, batch {args.batch}, 32x32, the command's steps {args.steps[0]} "
          f"minus {args.steps[1]}", flush=True)
    many, few = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        for i, image in enumerate(render_shapes(24, 32, seed=0)):
            save_png(image, data / f"{i:02d}.png")
        for asked in args.precisions:
            precision = resolve_precision(asked, torch.device("cpu"))
            cli, ours, theirs = [], [], []
            for r in range(args.rounds):
                cli.append((command_seconds(data, Path(tmp) / f"a{r}{asked}", args.preset, args.batch, asked, many)
                            - command_seconds(data, Path(tmp) / f"b{r}{asked}", args.preset, args.batch, asked, few))
                           / (many - few))
                for impl, runs in (("ours", ours), ("diffusers", theirs)):
                    result = in_fresh_process(impl, args.preset, args.batch, precision if impl == "ours" else "fp32",
                                              "cpu", False, impl == "ours", True, 32, timeout=3600)
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
