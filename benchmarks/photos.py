"""A second real-image data set that needs no download: square crops of the photographs scikit-image ships in its
wheel (astronaut, coffee, a cat, bricks, gravel, the Hubble deep field, ...), resized to the training size, half of
them mirrored. Thirteen photographs cut many ways are not a data set of thousands of photos, but they are real
photographs' colours, textures and edges, which the built-in shapes are not.

    pip install scikit-image
    python benchmarks/photos.py ./photos --n 2000 --size 32     # writes 2000 PNGs; the benchmarks call crops()
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

PHOTOGRAPHS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg"]


def crops(n: int, size: int, seed: int = 0, scale: tuple[float, float] = (0.15, 0.6)) -> torch.Tensor:
    """(n, 3, size, size) uint8: random square crops, each a `scale` fraction of its photograph's shorter side."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    photos = [Image.open(folder / name).convert("RGB") for name in PHOTOGRAPHS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(min(im.size) * rng.uniform(*scale))
        x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
        crop = np.asarray(im.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC))
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return torch.from_numpy(np.stack(out).copy()).permute(0, 3, 1, 2).contiguous()


def data_set(name: str, n: int, size: int, seed: int) -> torch.Tensor:
    """The benchmarks' two data sets by name: "shapes" (the built-in set) or "photos" (crops above)."""
    if name == "photos":
        return crops(n, size, seed)
    from diffuse_cli.images.shapes import render_shapes

    return render_shapes(n, size, seed=seed)


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
