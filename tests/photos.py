"""Crops of the photographs scikit-image ships in its wheel: real images with no download, for the tests
(test_mirror.py) and the benchmarks (benchmarks/photos.py)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def skimage_crops(names: list[str], n: int, scale: tuple[float, float], seed: int = 0, flip: bool = True,
                  size: int = 32) -> torch.Tensor:
    """Random square crops of scikit-image's sample photographs, each mirrored with probability 1/2 when `flip`.

    Crops of a few photographs overlap: unmirrored, a probe could learn the photographs themselves (the
    astronaut's flag is on the left) and tell their mirror images apart by memory. Mirroring half of the
    crops keeps every statistic of real photographs and leaves nothing to remember: a set that is its own
    mirror image, as a folder of many different photographs is."""
    import skimage  # a test dependency; tests skip without it

    folder = Path(skimage.__file__).parent / "data"
    photos = [Image.open(folder / name).convert("RGB") for name in names]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(min(im.size) * rng.uniform(*scale))
        x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
        crop = np.asarray(im.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC))
        out.append(crop[:, ::-1] if flip and rng.random() < 0.5 else crop)
    return torch.from_numpy(np.stack(out).copy()).permute(0, 3, 1, 2).contiguous()


PHOTOGRAPHS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg"]
TEXT = ["page.png", "text.png"]
