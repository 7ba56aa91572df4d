"""How well DDIM inversion comes back: the steps `diffuse interpolate` uses for its two images.

Held-out images are inverted to noise by DDIM (η = 0) and sampled back on the same steps; the table
gives the mean and the 99th percentile of |reconstruction - image| in 8-bit levels, and the time per
image, for each number of steps. The frames at the two ends of an interpolation are these
reconstructions.

    python benchmarks/inversion.py --checkpoint checkpoints/<run>     # a model of the built-in shapes
    python benchmarks/inversion.py --checkpoint checkpoints/<run> --steps 10 25 50 100 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
import diffuse_cli as diffuse  # noqa: E402
from diffuse_cli.diffusion.pixels import to_model, to_uint8  # noqa: E402
from diffuse_cli.diffusion.editing import ddim_invert  # noqa: E402
from diffuse_cli.diffusion.denoiser import Denoiser  # noqa: E402
from diffuse_cli.diffusion.samplers import ddim, spaced_timesteps  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50, 100, 200])
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    model = diffuse.load(args.checkpoint, "cpu")
    m = model.config.model
    images = render_shapes(args.n, m.image_size, seed=1)[:, :m.channels]  # held out: training used seed 0
    denoiser = Denoiser(model.net, model.config)
    eps_model = denoiser.eps_model(args.n)
    print(f"{args.checkpoint}: {args.n} held-out built-in shapes at {m.image_size}x{m.image_size}")
    print("| DDIM steps | mean error (8-bit levels) | 99th percentile | ms per image, there and back |")
    print("|---|---|---|---|")
    for steps in args.steps:
        ts = spaced_timesteps(denoiser.schedule, steps, "trailing")
        start = time.perf_counter()
        back = to_uint8(ddim(eps_model, ddim_invert(eps_model, to_model(images), denoiser.schedule, ts),
                             denoiser.schedule, ts))
        ms = (time.perf_counter() - start) / args.n * 1000
        error = (back.float() - images.float()).abs()
        print(f"| {steps} | {error.mean():.2f} | {error.flatten().quantile(0.99):.0f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
