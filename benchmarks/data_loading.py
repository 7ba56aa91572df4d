"""What decoding images on demand costs a training step, with and without the read-ahead.

A set too large for memory is decoded batch by batch (`data.ReadAhead`): each batch starts on a
background thread during the step before. This writes a folder of JPEGs, times decoding one
batch, then runs steps that take 1.5x that long while leaving the CPU free, as a step on a GPU
does (a sleep stands in for it), first decoding each batch when it is needed, then reading ahead.

    python benchmarks/data_loading.py                      # 512x384 JPEGs at --image-size 64 and 256
    python benchmarks/data_loading.py --sizes 128 --batch 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffuse_cli.images.data as data_module
from diffuse_cli.images.data import ReadAhead, load_folder


def write_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """n smooth 512x384 photos-to-be (an 8x8 random image enlarged), as JPEG at quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((512, 384), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)


def seconds_per_step(data, batches: list[torch.Tensor], step_s: float, read_ahead: bool) -> float:
    ahead = ReadAhead(data)
    start = time.perf_counter()
    for k, indices in enumerate(batches):
        ahead.get(k, indices) if read_ahead else data.batch(indices)
        if read_ahead and k + 1 < len(batches):
            ahead.fetch(k + 1, batches[k + 1])
        time.sleep(step_s)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    data_module.memory_available = lambda: 0  # every set is "too large": decoded on demand
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(Path(folder), 400)
        for size in args.sizes:
            data = load_folder(folder, size)
            g = torch.Generator().manual_seed(0)
            batches = [torch.randint(0, len(data), (args.batch,), generator=g) for _ in range(args.steps)]
            start = time.perf_counter()
            for indices in batches:
                data.batch(indices)
            decode = (time.perf_counter() - start) / args.steps
            step = 1.5 * decode
            on_demand, ahead = (seconds_per_step(data, batches, step, r) for r in (False, True))
            print(f"--image-size {size}, batch {args.batch}: decoding {decode * 1e3:.0f} ms; a {step * 1e3:.0f} ms step "
                  f"takes {on_demand * 1e3:.0f} ms decoding when needed, {ahead * 1e3:.0f} ms reading ahead")


if __name__ == "__main__":
    main()
