"""Sample quality against network calls (NFE), for every sampler.

1. On the closed-form 2-D mixture (toy.mixture_2d, exact ε-model): sliced Wasserstein distance
   of 1,000,000 samples to the mixture itself (toy.sliced_wasserstein_to, exact projected
   CDFs). The 'floor' is the same distance for exact draws, mean ± sd over 4 of them: what a
   perfect sampler scores. Most of it is the noise in how many points land in each mode, so
   every sampler starts from the same x_T (seed 0) and their differences are not noise.
2. With --checkpoint (a model trained on the built-in dataset): random-feature FD (common.py)
   of 512 samples to 2,000 held-out built-in images, the same 512 seeds for every sampler;
   then the time to sample 16 images at 25 NFE in fp32 with that model, and with an
   (untrained) `small` model at 32x32.

    python benchmarks/samplers.py
    python benchmarks/samplers.py --checkpoint checkpoints/<run>/model.safetensors
    python benchmarks/samplers.py --samplers dpm++3m dpm++3m-sde --d2-weight 2   # 3M at the Taylor weight
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # tests.toy: the exact mixture
from common import image_fd  # noqa: E402

from diffuse_cli.diffusion import samplers as engine_samplers  # noqa: E402
from diffuse_cli.formats.checkpoint import load_model  # noqa: E402
from diffuse_cli.diffusion.denoiser import generate  # noqa: E402
from diffuse_cli.diffusion.samplers import SAMPLERS, sample, steps_for_nfe  # noqa: E402
from diffuse_cli.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402
from tests.toy import mixture_2d, sliced_wasserstein_to  # noqa: E402

NFES = (10, 25, 50, 100)


def table(title: str, rows: dict[str, dict[int, float]], reference: float, ref_name: str) -> None:
    print(f"\n{title}")
    print(f"{'sampler':<13}" + "".join(f"{f'NFE {n}':>10}" for n in NFES) + f"{'@25 vs ' + ref_name:>22}")
    for name, values in rows.items():
        cells = "".join(f"{values[n]:>10.4f}" if n in values else f"{'-':>10}" for n in NFES)
        ratio = values.get(25, float("nan")) / reference
        print(f"{name:<13}{cells}" + (f"{ratio:>21.2f}x" if ratio == ratio else f"{'-':>22}"))  # no reference: -
    if reference == reference:  # not NaN: measured (--no-reference skips it)
        print(f"{ref_name:<13}{reference:>10.4f}", flush=True)


def closed_form(schedule_kind: str, n: int, samplers: list[str], spacing: str | None, with_ddpm_1000: bool) -> None:
    target, schedule = mixture_2d(), NoiseSchedule.make(schedule_kind)
    eps = target.eps_model(schedule)
    distance = lambda x: sliced_wasserstein_to(target, x, projections=64)  # noqa: E731
    run = lambda name, steps, spacing: sample(eps, (n, 2), schedule, name, steps,  # noqa: E731
                                              torch.Generator().manual_seed(0), spacing=spacing)
    rows = {name: {nfe: distance(run(name, steps_for_nfe(name, nfe), spacing)) for nfe in NFES} for name in samplers}
    ddpm_1000 = distance(run("ddpm", 1000, None)) if with_ddpm_1000 else float("nan")
    floors = torch.tensor([distance(target.sample(n, torch.Generator().manual_seed(seed))) for seed in range(4)])
    table(f"closed-form 2-D mixture, {schedule_kind} schedule: sliced W1 of {n:,} samples to the true distribution "
          f"(floor, exact draws: {floors.mean():.4f} ± {floors.std():.4f})", rows, ddpm_1000, "ddpm-1000")


def trained(checkpoint: str, samplers: list[str], spacing: str | None, with_ddpm_1000: bool, n: int = 512,
            nfes: tuple[int, ...] = (10, 25, 50)) -> None:
    model, config, _ = load_model(checkpoint)
    real = render_shapes(2000, config.model.image_size, seed=1)
    floor = image_fd(real, render_shapes(n, config.model.image_size, seed=5))
    fd: dict[str, dict[int, float]] = {}
    for name in [*samplers, "ddpm-1000"] if with_ddpm_1000 else samplers:
        fd[name] = {}
        for nfe in ((1000,) if name == "ddpm-1000" else nfes):
            sampler = "ddpm" if name == "ddpm-1000" else name
            images, _ = generate(model, config, n, sampler=sampler, steps=steps_for_nfe(sampler, nfe), seed=0,
                                 batch_size=n, precision="bf16", spacing=None if name == "ddpm-1000" else spacing)
            fd[name][nfe] = image_fd(real, images)
            print(f"  {name} NFE {nfe}: FD {fd[name][nfe]:.3f}", flush=True)
    table(f"{checkpoint}: random-feature FD, {n} samples vs 2000 held-out built-in images "
          f"(floor, {n} more real images: {floor:.3f})", fd, fd.pop("ddpm-1000", {1000: float("nan")})[1000], "ddpm-1000")
    for label, (net, cfg) in {f"this model ({config.model.image_size}x{config.model.image_size})": (model, config),
                              "small preset at 32x32": _small_32()}.items():
        for name in samplers:
            steps = steps_for_nfe(name, 25)
            generate(net, cfg, 16, sampler=name, steps=steps, seed=0)  # warm-up
            start = time.perf_counter()
            generate(net, cfg, 16, sampler=name, steps=steps, seed=0)
            print(f"16 images, {label}, {name} at 25 NFE (fp32): {time.perf_counter() - start:.2f} s")


def _small_32():
    from diffuse_cli.config import Config
    from diffuse_cli.presets import model_config
    from diffuse_cli.network.unet import UNet

    config = Config(model=model_config("small", image_size=32))
    return UNet(config.model).eval(), config


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a model trained on the built-in dataset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mixture-n", type=int, default=1_000_000, help="points per mixture sample")
    parser.add_argument("--skip-mixture", action="store_true")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--spacing", default=None, help="override every sampler's default spacing")
    parser.add_argument("--no-reference", action="store_true", help="skip 1000-step DDPM (the slow part)")
    parser.add_argument("--fd-samples", type=int, default=512, help="samples per FD on the trained model")
    parser.add_argument("--d2-weight", type=float, default=engine_samplers.D2_WEIGHT,
                        help="DPM-Solver++(3M)'s second-difference weight (samplers.D2_WEIGHT; 2 is the Taylor one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine_samplers.D2_WEIGHT = args.d2_weight  # dpmpp reads it at each step
    for kind in ("linear", "cosine") if not args.skip_mixture else ():
        closed_form(kind, args.mixture_n, args.samplers, args.spacing, not args.no_reference)
    if args.checkpoint:
        trained(args.checkpoint, args.samplers, args.spacing, not args.no_reference, args.fd_samples)
