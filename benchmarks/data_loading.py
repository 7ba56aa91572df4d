"""Whether reading images can ever hold training back: decoding, the cache, and the step beside them.

Writes N photo-like JPEGs (smooth colour fields with edges and noise, 512x384, quality 90), then for each image
size: the first run's decode into the cache (images/s, every core's decoder threads), the cache read back in
random batches of --batch the first time (its pages evicted from the system's page cache first, so they come
from disk) and again (from memory), and the training step's own rate for the `small` preset at that size on this
machine (images/s of `diffuse train`'s step, after warm-up). Reading is no bottleneck while it is faster than the
step, since the read-ahead overlaps it with the step before.

    python benchmarks/data_loading.py                        # 10,000 JPEGs at 64, 128 and 256 px
    python benchmarks/data_loading.py --n 2000 --sizes 256
    python benchmarks/data_loading.py --on-demand            # also: decoding each batch when needed (no cache)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
from common import timed, train_step_fn  # noqa: E402

from diffuse_cli.images.data import load_folder  # noqa: E402


def write_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """n 512x384 JPEGs: a blurred colour field, a few shapes and grain, so that they compress like photos."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((512, 384),
                                                                                         Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(field)
        for _ in range(3):
            x, y = rng.integers(0, 448), rng.integers(0, 320)
            draw.ellipse((x, y, x + rng.integers(20, 64), y + rng.integers(20, 64)),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        grain = rng.normal(0, 6, (384, 512, 3))
        pixels = np.clip(np.asarray(field.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64) + grain, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so that the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_rate(data, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for indices in batches:
        data.batch(indices)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def step_rate(size: int, batch: int) -> float:
    from diffuse_cli.presets import model_config
    from diffuse_cli.network.fast_ops import keep_cpu_memory
    from diffuse_cli.network.unet import UNet

    keep_cpu_memory()
    torch.manual_seed(0)
    model = UNet(model_config("small", image_size=size))
    x0 = torch.rand(batch, 3, size, size) * 2 - 1
    step = train_step_fn(model, model, x0, torch.randint(0, 1000, (batch,)), torch.randn_like(x0), "fp32")
    return batch / timed(step, repeats=2, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--step-batch", type=int, default=8, help="batch of the timed training steps")
    parser.add_argument("--on-demand", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        photos, cache = Path(scratch) / "photos", Path(scratch) / "cache"
        photos.mkdir()
        start = time.perf_counter()
        write_jpegs(photos, args.n)
        print(f"{args.n} JPEGs of 512x384 written in {time.perf_counter() - start:.0f} s "
              f"({sum(f.stat().st_size for f in photos.iterdir()) / 2**20:.0f} MB); {os.cpu_count()} cores")
        for size in args.sizes:
            start = time.perf_counter()
            data = load_folder(photos, size, cache=cache)
            decode = args.n / (time.perf_counter() - start)
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(len(data), generator=g)
            batches = list(order[:len(order) // args.batch * args.batch].split(args.batch))
            entry = next((cache / "data").glob(f"*-{size}px-3ch.u8"))
            evict(entry)
            again = load_folder(photos, size, cache=cache)  # a later run: the entry, mapped
            cold, warm = read_rate(again, batches), read_rate(again, batches)
            line = (f"{size:>4} px: decode into the cache {decode:7.0f} img/s; cached reads {cold:8.0f} img/s from "
                    f"disk, {warm:8.0f} img/s from memory ({entry.stat().st_size / 2**20:.0f} MB); training step "
                    f"(small, batch {args.step_batch}) {step_rate(size, args.step_batch):6.1f} img/s")
            if args.on_demand:
                lazy = load_folder(photos, size, cache=False)
                lazy.images = None  # decoded each batch, as a set too large for memory is without the cache
                line += f"; on-demand decoding {read_rate(lazy, batches[:10]):6.0f} img/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
