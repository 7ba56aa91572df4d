"""An imported diffusers model sampled by us and by diffusers' own pipelines, side by side in one run.

Ho et al.'s CIFAR-10 network (the config of google/ddpm-cifar10-32, random weights: speed does not
depend on them) is saved in diffusers' layout, imported with `diffuse_cli.import_diffusers`, and
sampled: 16 images with our default sampler (dpm++3m-sde, 25 network calls), with DDPMPipeline (its
1000 steps) and with DDIMPipeline (50 steps), fp32, on the same device.

    python benchmarks/diffusers_import.py
    python benchmarks/diffusers_import.py --device cuda
    python benchmarks/diffusers_import.py --ddpm-steps 100     # a shorter DDPM row, for a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
import diffuse_cli as diffuse  # noqa: E402
from tests.test_diffusers_format import DDPM_CIFAR10, randomised, save_pipeline  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    theirs = randomised(DDPM_CIFAR10)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pipeline(theirs, Path(tmp) / "ddpm-cifar10-32")
        model = diffuse.import_diffusers(folder, device=args.device)
        scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    theirs = theirs.to(args.device)
    ddpm = diffusers.DDPMPipeline(unet=theirs, scheduler=scheduler)
    ddim = diffusers.DDIMPipeline(unet=theirs, scheduler=diffusers.DDIMScheduler.from_config(scheduler.config))
    for pipe in (ddpm, ddim):
        pipe.set_progress_bar_config(disable=True)
    n, g = args.n, lambda: torch.Generator().manual_seed(0)  # noqa: E731
    model.sample(2, steps=2)  # warm-up, as the pipelines get below
    rows = [("diffuse, dpm++3m-sde (default)", 25, timed(lambda: model.sample(n, seed=0)))]
    ddpm(batch_size=2, num_inference_steps=2, generator=g(), output_type="np")
    rows.append((f"diffusers DDPMPipeline, {args.ddpm_steps} steps", args.ddpm_steps,
                 timed(lambda: ddpm(batch_size=n, num_inference_steps=args.ddpm_steps, generator=g(), output_type="np"))))
    rows.append((f"diffusers DDIMPipeline, {args.ddim_steps} steps", args.ddim_steps,
                 timed(lambda: ddim(batch_size=n, num_inference_steps=args.ddim_steps, generator=g(), output_type="np"))))
    print(f"{n} images of the ddpm-cifar10-32 network (35.7M parameters), fp32, {args.device}, torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads")
    print("| sampling | network calls | seconds | ms per call | vs ours |")
    print("|---|---|---|---|---|")
    for name, calls, seconds in rows:
        print(f"| {name} | {calls} | {seconds:.1f} | {seconds / calls * 1000:.0f} | {seconds / rows[0][2]:.1f}x |")


if __name__ == "__main__":
    main()
