"""A second real-image data set that needs no download: square crops of the photographs scikit-image ships in its
wheel (astronaut, coffee, a cat, bricks, gravel, the Hubble deep field, ...), resized to the training size, half of
them mirrored. Thirteen photographs cut many ways are not a data set of thousands of photos, but they are real
photographs' colours, textures and edges, which the built-in shapes are not.

    pip install scikit-image
    python benchmarks/photos.py ./photos --n 2000 --size 32     # writes 2000 PNGs; the benchmarks call crops()
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/photos.py: the crops the tests take too
from tests.photos import PHOTOGRAPHS, skimage_crops  # noqa: E402


def crops(n: int, size: int, seed: int = 0, scale: tuple[float, float] = (0.15, 0.6)) -> torch.Tensor:
    """(n, 3, size, size) uint8: random square crops, each a `scale` fraction of its photograph's shorter side."""
    return skimage_crops(PHOTOGRAPHS, n, scale, seed, flip=True, size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import diffuse_cli as diffuse

    diffuse.save_images(crops(args.n, args.size, args.seed), args.out, grid=False)
    print(f"{args.n} crops of {len(PHOTOGRAPHS)} photographs, {args.size} px: {args.out}")


if __name__ == "__main__":
    main()
