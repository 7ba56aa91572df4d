"""How good are samples after a fixed wall-clock budget: old (DDPM paper) against new defaults.

Trains the `small` preset on the built-in dataset (at its default 16x16) for the same time with
each recipe, samples
512 images with the default sampler (25 steps), and prints the random-feature FD
(common.py) to held-out built-in images. Lower is better; `python benchmarks/common.py` gives
the anchors (held-out real images, blurred images, noise).

    python benchmarks/convergence.py --budget 10m
    python benchmarks/convergence.py --budget 2m --recipes new
    python benchmarks/convergence.py --budget 1h --steps 1500 --recipes new new-fp32   # equal steps
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import image_fd  # noqa: E402

from diffuse_cli.checkpoint import load_model  # noqa: E402
from diffuse_cli.generate import generate  # noqa: E402
from diffuse_cli.shapes import render_shapes  # noqa: E402

RECIPES = {
    # Ho et al. 2020: ε, linear schedule, lr 2e-4 constant, no EMA, fp32; our first cut.
    "old": ["--objective", "eps", "--schedule", "linear", "--lr", "2e-4", "--lr-schedule", "constant",
            "--min-snr-gamma", "0", "--ema-max-decay", "0", "--precision", "fp32", "--warmup", "0"],
    "new": [],  # the current defaults
    "new-fp32": ["--precision", "fp32"],  # the same in fp32: does bf16 autocast cost quality per step?
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--steps", type=int, default=4000, help="--steps for every recipe (the LR schedule's length)")
    parser.add_argument("--recipes", nargs="+", default=["old", "new"], choices=list(RECIPES))
    parser.add_argument("--out", default="checkpoints/convergence")
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()

    results = {}
    for name in args.recipes:
        run = Path(args.out) / name
        cmd = [sys.executable, "-m", "diffuse_cli", "train", "--max-time", args.budget, "--steps", str(args.steps),
               "--out", str(run), "--sample-every", "100000", "--save-every", "100000", *RECIPES[name]]
        if (run / "model.safetensors").exists():
            print(f"reusing {run} (delete it to train again)", flush=True)
        else:
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)
        model, config, info = load_model(run / "model.safetensors")
        held_out = render_shapes(args.samples, config.model.image_size, seed=1)  # at the model's resolution
        images, _ = generate(model, config, args.samples, seed=0, batch_size=128, precision="bf16")
        results[name] = {"steps": info["step"], "images_seen": info["images_seen"], "fd": image_fd(held_out, images)}
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{'recipe':<10}{'steps':>8}{'images':>10}{'random-feature FD':>20}   (budget {args.budget})")
    for name, r in results.items():
        print(f"{name:<10}{r['steps']:>8}{r['images_seen']:>10}{r['fd']:>20.3f}")


if __name__ == "__main__":
    main()
