"""How good are samples after a fixed wall-clock budget: old (DDPM paper) against new defaults.

Trains the `small` preset on the built-in dataset (at its default 16x16) for the same time with
each recipe, samples 512 images with the default sampler (25 steps, fp32, as `diffuse sample`
runs), and prints the random-feature FD (common.py) to held-out built-in images. Lower is
better; `python benchmarks/common.py` gives the anchors (held-out real images, blurred images,
noise). One model's FD moves by up to 3x between sets of samples, so each model is scored on
`--sample-seeds` sets (3 by default) and the table shows their mean and range.

The `diffusers-example` recipe is the tool people use instead: diffusers' UNet2DModel with the
same architecture, trained with the defaults of diffusers' train_unconditional.py example (ε,
linear schedule, lr 1e-4 with 500 warm-up steps and cosine decay, AdamW β = (0.95, 0.999),
weight decay 1e-6, clipping at 1, EMA with warm-up, batch 16, fp32), fed from the same in-memory
images (which spares it the example's per-image PIL transforms). It is sampled twice: with our
default sampler, and as its DDPMPipeline does (1000 DDPM steps; one set of samples only, it takes
40 times as long).

    python benchmarks/convergence.py --budget 10m
    python benchmarks/convergence.py --budget 10m --recipes new diffusers-example   # needs '.[bench]'
    python benchmarks/convergence.py --budget 2m --recipes new
    python benchmarks/convergence.py --budget 1h --steps 1500 --recipes new new-fp32   # equal steps
    python benchmarks/convergence.py --data glyphs --budget 4m --recipes new hflip-on hflip-off

`--data glyphs` trains on rendered characters instead (tests/glyphs.py, written to a folder of
PNGs as a user's data would be): a data set with a handedness, on which mirroring (`--hflip on`)
teaches the model mirror-writing, and `--hflip auto` (the default, recipe `new`) should not mirror.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # tests.glyphs
from common import image_fd  # noqa: E402

from diffuse_cli.formats.checkpoint import load_model  # noqa: E402
from diffuse_cli.presets import BUILTIN_IMAGE_SIZE, model_config  # noqa: E402
from diffuse_cli.config import Config, DiffusionConfig  # noqa: E402
from diffuse_cli.api_settings import parse_duration  # noqa: E402
from diffuse_cli.diffusion.denoiser import generate  # noqa: E402
from diffuse_cli.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402
from tests.glyphs import render_glyphs  # noqa: E402

RECIPES = {
    # Ho et al. 2020: ε, linear schedule, lr 2e-4 constant, no EMA, fp32; our first cut.
    "old": ["--objective", "eps", "--schedule", "linear", "--lr", "2e-4", "--lr-schedule", "constant",
            "--min-snr-gamma", "0", "--ema-max-decay", "0", "--precision", "fp32", "--warmup", "0"],
    "new": [],  # the current defaults
    "new-fp32": ["--precision", "fp32"],  # the same in fp32: does bf16 autocast cost quality per step?
    "hflip-on": ["--hflip", "on"],  # the defaults, but always mirroring (before --hflip auto, the default)
    "hflip-off": ["--hflip", "off"],  # the defaults, never mirroring
    "diffusers-example": None,  # not ours: trained by train_diffusers_example below
}


def train_diffusers_example(budget_s: float, image_size: int, seed: int = 0):
    """diffusers' UNet2DModel (`small`'s architecture) trained for budget_s seconds as its
    train_unconditional.py example trains by default; returns (EMA model, steps, images seen)."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from train_speed import diffusers_unet

    from diffuse_cli.images.data import load_builtin
    from diffuse_cli.diffusion.pixels import to_model

    torch.manual_seed(seed)
    images = load_builtin(image_size).images
    model = diffusers_unet("small", image_size)
    schedule = NoiseSchedule.make("linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    batch, epochs = 16, 100
    lr_schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                num_training_steps=epochs * len(images) // batch)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    start, step = time.monotonic(), 0
    model.train()
    while time.monotonic() - start < budget_s:
        x0 = to_model(images[torch.randint(0, len(images), (batch,))])
        x0 = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x0.flip(-1), x0)
        t, eps = torch.randint(0, schedule.timesteps, (batch,)), torch.randn_like(x0)
        loss = torch.nn.functional.mse_loss(model(schedule.q_sample(x0, t, eps), t).sample, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        step += 1
    ema.copy_to(model.parameters())
    return model.eval(), step, step * batch


class EpsNetwork(torch.nn.Module):
    """diffusers' UNet2DModel as our samplers call a network: (x_t, t) -> output tensor."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


@torch.no_grad()
def sample_diffusers_pipeline(model, n: int, image_size: int, batch: int = 128) -> torch.Tensor:
    """n images as DDPMPipeline draws them: 1000 DDPM steps of diffusers' own scheduler."""
    from diffusers import DDPMScheduler

    from diffuse_cli.diffusion.pixels import to_uint8

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(1000)
    out = []
    for first in range(0, n, batch):
        g = torch.Generator().manual_seed(first)
        x = torch.randn(min(batch, n - first), 3, image_size, image_size, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, generator=g).prev_sample
        out.append(to_uint8(x))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--steps", type=int, default=None,
                        help="--steps for every recipe (the LR schedule's length); default: none, so that "
                             "`diffuse train` fits them to the budget, as it does for a user")
    parser.add_argument("--recipes", nargs="+", default=["old", "new"], choices=list(RECIPES))
    parser.add_argument("--out", default="checkpoints/convergence")
    parser.add_argument("--samples", type=int, default=512, help="images per set of samples")
    parser.add_argument("--sample-seeds", type=int, default=3, help="sets of samples scored per model")
    parser.add_argument("--data", choices=["shapes", "glyphs"], default="shapes",
                        help="the built-in shapes, or rendered characters (a data set with a handedness)")
    args = parser.parse_args()
    seeds = [i * args.samples for i in range(args.sample_seeds)]  # disjoint: image i has seed + i
    render, data = render_shapes, []
    if args.data == "glyphs":
        render, data = render_glyphs, [str(write_glyphs(Path(args.out) / "glyphs-data"))]

    results = {}
    for name in args.recipes:
        if name == "diffusers-example":
            results.update(diffusers_example(parse_duration(args.budget), args.samples, seeds))
            continue
        run = Path(args.out) / (name if args.data == "shapes" else f"{args.data}-{name}")
        steps = ["--steps", str(args.steps)] if args.steps else []
        cmd = [sys.executable, "-m", "diffuse_cli", "train", *data, "--max-time", args.budget, *steps,
               "--out", str(run), "--sample-every", "100000", "--save-every", "100000", *RECIPES[name]]
        if (run / "model.safetensors").exists():
            print(f"reusing {run} (delete it to train again)", flush=True)
        else:
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)
        model, config, info = load_model(run / "model.safetensors")
        held_out = render(args.samples, config.model.image_size, seed=1)  # at the model's resolution
        held_out = held_out[:, :config.model.channels]  # glyphs are gray, and train a 1-channel model
        fds = [image_fd(held_out, generate(model, config, args.samples, seed=seed, batch_size=128)[0])
               for seed in seeds]
        results[name] = {"steps": info["step"], "images_seen": info["images_seen"], "fd": fds}
        print(json.dumps({name: results[name]}), flush=True)
    width = max(map(len, ["recipe", *results])) + 2
    print(f"\n{'recipe':<{width}}{'steps':>8}{'images':>10}   random-feature FD: mean (min-max over sample sets)"
          f"   (budget {args.budget})")
    for name, r in results.items():
        fds = r["fd"]
        spread = f" ({min(fds):.3f}-{max(fds):.3f})" if len(fds) > 1 else ""
        print(f"{name:<{width}}{r['steps']:>8}{r['images_seen']:>10}   {sum(fds) / len(fds):.3f}{spread}")


def write_glyphs(folder: Path, n: int = 8192) -> Path:
    """The glyph data set as a folder of PNGs at BUILTIN_IMAGE_SIZE (once), which `diffuse train` reads."""
    from diffuse_cli.images.pictures import save_png

    if not (folder / f"{n - 1:05d}.png").exists():
        for i, image in enumerate(render_glyphs(n, BUILTIN_IMAGE_SIZE, seed=0)):
            save_png(image, folder / f"{i:05d}.png")
    return folder


def diffusers_example(budget_s: float, n: int, seeds: list[int]) -> dict:
    """Train the diffusers-example recipe, sample it both ways, and score each."""
    size = BUILTIN_IMAGE_SIZE
    print(f"diffusers' UNet2DModel, train_unconditional.py's defaults, for {budget_s:.0f} s", flush=True)
    model, steps, seen = train_diffusers_example(budget_s, size)
    held_out = render_shapes(n, size, seed=1)
    # The same network under our default sampler: its config says what it was trained for (ε, linear).
    config = Config(preset="small", model=model_config("small", image_size=size),
                    diffusion=DiffusionConfig(schedule="linear", objective="eps"))
    ours = [generate(EpsNetwork(model), config, n, seed=seed, batch_size=128)[0] for seed in seeds]
    results = {"diffusers-example, our sampler": ours,
               "diffusers-example, DDPMPipeline (1000)": [sample_diffusers_pipeline(model, n, size)]}
    results = {k: {"steps": steps, "images_seen": seen, "fd": [image_fd(held_out, images) for images in v]}
               for k, v in results.items()}
    for k, v in results.items():
        print(json.dumps({k: v}), flush=True)
    return results


if __name__ == "__main__":
    main()
