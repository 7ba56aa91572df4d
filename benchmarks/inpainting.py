"""Inpainting against its closed form: how close RePaint's resampling gets to the exact conditional.

On the 2-D mixture (toy.mixture_2d, exact ε-model) one coordinate is kept at a value and the other is
generated; the exact answer is the mixture's conditional (toy.GaussianMixture.conditional), in most of
these cases two modes whose weights the kept value sets. For each sampler, number of steps and
--resample-jumps, the 1-D Wasserstein distance of 20,000 inpainted values to that conditional, averaged
over the kept values below, and the network calls it took. 'floor': the same distance for exact draws.

With --images, on a trained model too: `small` trained on the built-in 16x16 shapes without their
labels (--classes off, so only the kept pixels say which shape), --budget of CPU time; held-out shapes
have their right half (or a centre square, --mask centre) generated again. It reports how often the
shape classifier of benchmarks/guidance.py finds the shape the image started as, and the random-feature
FD (common.py) of the inpainted images to held-out shapes, at the default sampler and steps.

    python benchmarks/inpainting.py
    python benchmarks/inpainting.py --samplers ddpm --steps 25 100 --jumps 0 4 9 19
    python benchmarks/inpainting.py --images --budget 5m --jumps 0 1 2 4 9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from diffuse_cli.diffusion.editing import edit, plan_edit  # noqa: E402
from diffuse_cli.diffusion.samplers import SAMPLERS, spaced_timesteps  # noqa: E402
from diffuse_cli.diffusion.schedule import NoiseSchedule  # noqa: E402
from tests.toy import mixture_2d, sliced_wasserstein_to  # noqa: E402

# (kept coordinate, its value): between two modes, on one mode, and out on a tail
CASES = ((0, -0.3), (0, 0.3), (0, 0.6), (1, 0.1), (1, -0.35), (1, 0.9))


def distance(sampler: str, steps: int, jumps: int, n: int, schedule: NoiseSchedule) -> tuple[float, int]:
    target, total = mixture_2d(), []
    ts = spaced_timesteps(schedule, steps, SAMPLERS[sampler].spacing)
    plan = plan_edit(ts, schedule.timesteps, 1.0, inpaint=True, jumps=jumps)
    for kept, value in CASES:
        init = torch.zeros(n, 2, dtype=torch.float64)
        init[:, kept] = value
        generate = torch.ones(n, 2, dtype=torch.bool)
        generate[:, kept] = False
        x = edit(sampler, target.eps_model(schedule), init, schedule, plan, generate, torch.Generator().manual_seed(0))
        exact = target.conditional([kept], torch.tensor([value]))
        total.append(sliced_wasserstein_to(exact, x[:, 1 - kept:2 - kept], projections=1))
    return sum(total) / len(total), plan.nfe(sampler)


def on_images(args: argparse.Namespace) -> None:
    import diffuse_cli as diffuse
    from common import image_fd
    from diffuse_cli.presets import BUILTIN_IMAGE_SIZE
    from diffuse_cli.images.shapes import render_shapes, shape_kinds
    from guidance import classify, shape_classifier, train

    size, n = BUILTIN_IMAGE_SIZE, args.per_jumps
    judge = shape_classifier(size)
    run = Path(args.out) / "unlabelled"
    train(run, args.budget, ["--classes", "off"])
    model = diffuse.load(run, "cpu")
    held_out, kinds = render_shapes(2 * n, size, seed=1), shape_kinds(2 * n, seed=1)
    init, reference, asked = held_out[:n], held_out[n:], kinds[:n]
    generate = torch.zeros(size, size, dtype=torch.bool)
    if args.mask == "right":
        generate[:, size // 2:] = True
    else:
        generate[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    print(f"\nthe judge on the held-out shapes themselves: {(classify(judge, init) == asked).float().mean():.1%} right")
    print(f"small, {args.budget} on this CPU, --classes off; {n} held-out shapes, the {args.mask} generated again;"
          " default sampler and steps")
    print("| --resample-jumps | network calls | shape kept | FD to held-out | seconds |")
    print("|---|---|---|---|---|")
    for jumps in args.jumps:
        start = time.perf_counter()
        images = torch.cat([model.sample(1, init=init[i:i + 64], mask=generate, resample_jumps=jumps, seed=i,
                                         batch_size=64) for i in range(0, n, 64)])
        seconds = time.perf_counter() - start
        kept = (classify(judge, images) == asked).float().mean().item()
        edit = model.edit_inputs(init[:1], generate)
        print(f"| {jumps} | {model.nfe(diffuse.SampleConfig(resample_jumps=jumps), edit)} | {kept:.1%} | "
              f"{image_fd(reference, images):.3f} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=["dpm++3m-sde", "ddpm", "ddim"])
    parser.add_argument("--steps", nargs="+", type=int, default=[25, 50, 100])
    parser.add_argument("--jumps", nargs="+", type=int, default=[0, 1, 2, 4, 9])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--images", action="store_true", help="on a model trained on the built-in shapes")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--mask", choices=["right", "centre"], default="right")
    parser.add_argument("--per-jumps", type=int, default=512, help="inpainted images per --resample-jumps value")
    parser.add_argument("--out", default="checkpoints/inpainting")
    args = parser.parse_args()
    if args.images:
        return on_images(args)
    schedule, target = NoiseSchedule.make(args.schedule), mixture_2d()
    floors = []
    for kept, value in CASES:
        exact = target.conditional([kept], torch.tensor([value]))
        floors.append(sliced_wasserstein_to(exact, exact.sample(args.n, torch.Generator().manual_seed(1)), projections=1))
    print(f"floor (exact draws): {sum(floors) / len(floors):.4f}; {args.schedule} schedule, n = {args.n}")
    print("| sampler | steps | " + " | ".join(f"jumps {j}" for j in args.jumps) + " |")
    print("|---|---|" + "---|" * len(args.jumps))
    for sampler in args.samplers:
        for steps in args.steps:
            start, cells = time.perf_counter(), []
            for jumps in args.jumps:
                w1, nfe = distance(sampler, steps, jumps, args.n, schedule)
                cells.append(f"{w1:.4f} ({nfe})")
            print(f"| {sampler} | {steps} | " + " | ".join(cells) + f" |  {time.perf_counter() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
