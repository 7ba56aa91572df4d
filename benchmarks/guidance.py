"""Classifier-free guidance on the built-in shapes: does `--class` draw the class asked for, and how well?

Trains `small` on the built-in 16x16 shapes (whose four shapes are its classes) for a fixed budget,
and, for comparison, the same with `--classes off` (an unconditional model). A small CNN trained on
other built-in shapes (held out from both) judges the samples. For each guidance weight w it
reports the share of samples of the requested class and the random-feature FD (common.py) of each
class's samples to held-out images of that class; the unconditional model's row is its overall FD
to held-out images of every class, and, for the conditional model, its samples with no class.

    python benchmarks/guidance.py --budget 5m
    python benchmarks/guidance.py --budget 5m --weights 1 3 --per-class 256
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import image_fd  # noqa: E402

import diffuse_cli as diffuse  # noqa: E402
from diffuse_cli.presets import BUILTIN_IMAGE_SIZE  # noqa: E402
from diffuse_cli.diffusion.pixels import to_model  # noqa: E402
from diffuse_cli.images.shapes import SHAPES, render_shapes, shape_kinds  # noqa: E402


def shape_classifier(size: int, n: int = 8192, steps: int = 600, seed: int = 2) -> nn.Module:
    """A small CNN that tells the four built-in shapes apart, trained on shapes no model saw (seed 2)."""
    torch.manual_seed(seed)
    images, kinds = to_model(render_shapes(n, size, seed=seed)), shape_kinds(n, seed=seed)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, len(SHAPES)))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        rows = torch.randint(n, (128,))
        loss = nn.functional.cross_entropy(net(images[rows]), kinds[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def classify(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(to_model(part)).argmax(1) for part in images.split(512)])


def train(run: Path, budget: str, extra: list[str]) -> None:
    if (run / "model.safetensors").exists():
        print(f"reusing {run} (delete it to train again)", flush=True)
        return
    cmd = [sys.executable, "-m", "diffuse_cli", "train", "--max-time", budget, "--out", str(run),
           "--sample-every", "100000", "--save-every", "100000", *extra]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--weights", nargs="+", type=float, default=[0, 1, 2, 3, 4, 7])
    parser.add_argument("--per-class", type=int, default=256, help="samples of each class per weight")
    parser.add_argument("--out", default="checkpoints/guidance")
    args = parser.parse_args()
    size, k = BUILTIN_IMAGE_SIZE, len(SHAPES)
    judge = shape_classifier(size)
    held_out, held_kinds = render_shapes(4096, size, seed=1), shape_kinds(4096, seed=1)
    print(f"the judge on held-out real shapes: {(classify(judge, held_out) == held_kinds).float().mean():.1%} right",
          flush=True)
    train(Path(args.out) / "conditional", args.budget, [])
    train(Path(args.out) / "unconditional", args.budget, ["--classes", "off"])
    model = diffuse.load(Path(args.out) / "conditional", "cpu")
    plain = diffuse.load(Path(args.out) / "unconditional", "cpu")
    n = args.per_class
    real = [held_out[held_kinds == c][:n] for c in range(k)]

    print(f"\nsmall, {args.budget} on a 2-core CPU each, default sampler (25 steps); {n} samples a class;"
          f" FD to {n} held-out images of the class")
    print(f"{'':<34}{'requested class':>16}  " + "  ".join(f"{name:>9}" for name in SHAPES) + "  mean FD")
    for w in args.weights:
        images = model.sample(n, classes="all", guidance=w, seed=0, batch_size=128)
        asked = torch.arange(k).repeat_interleave(n)
        right = (classify(judge, images) == asked).float().mean().item()
        fds = [image_fd(real[c], images[asked == c]) for c in range(k)]
        print(f"{'conditional, --guidance ' + f'{w:g}':<34}{right:>16.1%}  " + "  ".join(f"{f:>9.3f}" for f in fds)
              + f"  {sum(fds) / k:>7.3f}", flush=True)
    for name, m in (("conditional, no --class", model), ("unconditional (--classes off)", plain)):
        images = m.sample(n, seed=0, batch_size=128)  # as many as a class has above: FD grows as samples shrink
        print(f"{name:<34}{'-':>16}  " + "  ".join(f"{'-':>9}" for _ in SHAPES)
              + f"  {image_fd(held_out[:n], images):>7.3f} (all classes)", flush=True)


if __name__ == "__main__":
    main()
