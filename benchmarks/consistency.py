"""Consistency distillation (Song et al. 2023), measured beside `diffuse distill`'s method from the same teacher.

    pip install -e '.[eval]'
    python benchmarks/consistency.py --teacher study/teacher --reference study/reference --time 10m --steps 4 2 1

A study, not a feature: it trains a student by consistency distillation through `diffuse distill`'s own loop (its
run folder, progress, --max-time), with the loss below in place of the distillation identity's, then samples it by
multistep consistency sampling at each of --steps and scores 500 samples against --reference with `diffuse eval`'s
FID and KID, as benchmarks/distill.py scores its rows (rows.jsonl beside the student).

The loss (CD with the squared error, Song et al. 2023, Algorithm 2; the target network is the student itself without
gradients, which Song & Dhariwal 2023 found best for consistency training): the teacher's DDIM grid of --teacher-steps trailing steps t_0 > t_1 >
... ; an image noised to z at t_n, one teacher DDIM step from z to t_{n+1} (to the clean image after the last), and
the student's x̂_0 at (z, t_n) trained towards its own x̂_0 at the teacher's point, or towards that point itself
after the last step (the boundary condition f(x, 0) = x). Every n equally often. The student's x̂_0 is its
objective's, unclipped. Sampling in k steps: x̂_0 = f(x_T, t) at the first of k trailing steps, then noised afresh to
each next step and denoised again (Song et al., Algorithm 1): k network calls, one model for every k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

import diffuse_cli as diffuse  # noqa: E402
from diffuse_cli.diffusion.denoiser import Denoiser, random_classes  # noqa: E402
from diffuse_cli.diffusion.objectives import as_eps_model  # noqa: E402
from diffuse_cli.diffusion.samplers import spaced_timesteps  # noqa: E402
from diffuse_cli.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffuse_cli.training import loop  # noqa: E402


def x0_model(net, objective: str, schedule: NoiseSchedule):
    """(x_t, t) -> the network's x̂_0, unclipped, for any objective; net(x, t) takes the batch's classes already."""
    eps_model = as_eps_model(net, schedule, objective, clip_x0=False)
    return lambda x, t: schedule.predict_x0(x, t, eps_model(x, t).float())


@torch.no_grad()
def teacher_step(eps_model, z: torch.Tensor, t_from: torch.Tensor, n: torch.Tensor, schedule: NoiseSchedule,
                 fine: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the teacher for each image, from t_from = fine[n] to fine[n + 1] (the clean image after the
    last): every image at its own step, in one network call."""
    eps = eps_model(z, t_from).float()
    x0 = schedule.predict_x0(z, t_from, eps)
    after = torch.cat([schedule.alpha_bar_at(fine).double()[1:], torch.ones(1, dtype=torch.float64)])
    ab_to = after[n].to(z.device, z.dtype).view((-1,) + (1,) * (z.ndim - 1))
    return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps


def consistency_loss(student, teacher, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                     eps: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """The consistency distillation loss on a batch: student(x, t) is the student's x̂_0 (with gradients), teacher
    the teacher's ε-model for the batch; each image's step n = t·N/T of the N-step grid `fine`."""
    n = (t.cpu() * len(fine)).div(schedule.timesteps, rounding_mode="floor")
    t_from = fine[n].to(t.device)
    z = schedule.q_sample(x0, t_from, eps)
    z_to = teacher_step(teacher, z, t_from, n, schedule, fine)
    with torch.no_grad():  # the student's x̂_0 at the teacher's point; after the last step, the point itself
        t_to = fine[(n + 1).clamp(max=len(fine) - 1)].to(t.device)
        last = (n + 1 == len(fine)).to(z.device).view((-1,) + (1,) * (z.ndim - 1))
        goal = torch.where(last, z_to, student(z_to, t_to).to(z_to.dtype))
    return (student(z, t_from).float() - goal.float()).square().mean()


@torch.no_grad()
def consistency_sample(model, n: int, steps: int, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """n images (uint8) by multistep consistency sampling in `steps` network calls."""
    config = model.config
    schedule = NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)
    grid = spaced_timesteps(schedule, steps, "trailing")
    net = Denoiser(model.net, config).net
    classes = len(config.model.class_names)
    generator = torch.Generator().manual_seed(seed)
    m, size, out = config.model.channels, config.model.image_size, []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        # a conditional model's classes drawn as `diffuse sample` draws them when none is asked, unguided
        y = random_classes(seed + start, count, classes, model.class_weights()) if classes else None
        f = x0_model(net if y is None else lambda x, t, y=y: net(x, t, y), config.diffusion.objective, schedule)
        x = torch.randn(count, m, size, size, generator=generator)
        for k, t in enumerate(grid):
            x0 = f(x, t.repeat(count)).clamp(-1, 1)
            if k + 1 < len(grid):
                t_next = grid[k + 1].repeat(count)
                x = schedule.q_sample(x0, t_next, torch.randn(x0.shape, generator=generator))
        out.append(((x0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def patched_teacher_loss(teacher_steps: int):
    """loop.teacher_loss with the consistency loss in place of the distillation identity's."""

    def teacher_loss(config, teacher, teacher_config, schedule, precision):
        denoiser = Denoiser(teacher, teacher_config, precision)
        fine = spaced_timesteps(schedule, teacher_steps, "trailing")
        objective = config.diffusion.objective

        def loss(net, x0, t, eps, labels):
            student = net if labels is None else lambda x, steps: net(x, steps, labels)
            teacher_eps = denoiser.eps_model(len(x0), labels)  # the batch's classes, unguided
            return consistency_loss(x0_model(student, objective, schedule), teacher_eps, schedule, x0, t, eps, fine)
        return loss
    return teacher_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="a trained run (benchmarks/distill.py --work)")
    parser.add_argument("--reference", type=Path, required=True, help="the images to score against")
    parser.add_argument("--out", type=Path, help="the student's run folder (default: <teacher>-consistency)")
    parser.add_argument("--time", default="10m", help="the distillation's --max-time")
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--lr", type=float, help="default: distill's own")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--untrained", action="store_true", help="score the teacher itself, sampled as the student "
                        "would be (where consistency distillation starts), instead of distilling")
    args = parser.parse_args()
    print(machine_line("cpu"), flush=True)
    out = args.out or args.teacher.parent / f"{args.teacher.name}-consistency"
    if args.untrained:
        student, name, out = diffuse.load(args.teacher), "teacher, multistep consistency sampling", args.teacher
    else:
        loop.teacher_loss = patched_teacher_loss(args.teacher_steps)
        start = time.perf_counter()
        recipe = {} if args.lr is None else {"lr": args.lr}
        # steps=1: the run's config must name a student; its sampler here is consistency_sample, not DDIM
        student = diffuse.distill(args.teacher, out, steps=1, teacher_steps=args.teacher_steps, max_time=args.time,
                                  **recipe)
        minutes = (time.perf_counter() - start) / 60
        name = f"consistency student ({student.training.step} steps, {minutes:.1f} min)"
        print(name, flush=True)
    for steps in args.steps:
        began = time.perf_counter()
        images = consistency_sample(student, args.n, steps)
        seconds = time.perf_counter() - began
        folder = out.parent / f"{out.name}-consistency-samples-{steps}"
        diffuse.save_images(images, folder, grid=False)
        s = diffuse.evaluate(folder, args.reference).scores
        row = dict(model=name, steps=steps, seconds=seconds, fid=s.fid, kid=s.kid_mean, n=args.n)
        print(row, flush=True)
        with open(out.parent / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
