"""Distillation's one identity: what a student must predict so that one DDIM step lands where several of the
teacher's land (Salimans & Ho 2022, eq. 8, here for any number of teacher steps in one student step).

| symbol         | here                     | meaning                                                                 |
|----------------|--------------------------|-------------------------------------------------------------------------|
| t, s           | `t_from`, `t_to`         | the step a student step starts at, and the one it ends at (s < t; the clean image after the last) |
| α_t, σ_t       | sqrt(ᾱ_t), sqrt(1 - ᾱ_t) | how much image and how much noise x_t holds (schedule.py)                |
| z_t            | `z`                      | the point the step starts from                                          |
| z_s            | `z_to`                   | where the teacher's DDIM steps from z_t to s end                         |
| x̃              | `student_target`         | the x̂_0 whose DDIM step from z_t lands on z_s                            |

DDIM (eta 0) steps from z_t to s with a prediction x̂ as z_s = α_s x̂ + σ_s ε̂, ε̂ = (z_t - α_t x̂) / σ_t. Solved for
x̂: x̃ = (z_s - (σ_s/σ_t) z_t) / (α_s - (σ_s/σ_t) α_t). At the clean end (ᾱ_s = 1) it is z_s, the teacher's image.
The student is trained to give x̃ in its own objective (ε̃ = (z_t - α_t x̃) / σ_t, then ε, x_0 or v as
objectives.target makes them), so a student of any objective takes the identity's step.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import Objective
from ..errors import ConfigError
from .objectives import EpsModel, target
from .samplers import ddim, spaced_timesteps
from .schedule import NoiseSchedule


def student_target(z: torch.Tensor, z_to: torch.Tensor, ab_from: torch.Tensor, ab_to: torch.Tensor) -> torch.Tensor:
    """x̃: the x̂_0 whose DDIM step from z at ᾱ = ab_from lands on z_to at ᾱ = ab_to (1: the clean image); ab_*
    per image, shaped to broadcast against z."""
    ratio = ((1 - ab_to) / (1 - ab_from)).sqrt()  # σ_s / σ_t
    return (z_to - ratio * z) / (ab_to.sqrt() - ratio * ab_from.sqrt())


def grids(schedule: NoiseSchedule, steps: int, teacher_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's steps and the teacher's, both trailing-spaced, the student's every k-th of the teacher's."""
    if teacher_steps % steps or teacher_steps <= steps:
        raise ConfigError(f"the teacher's steps ({teacher_steps}) must be a multiple of the student's ({steps}), and "
                          "more")
    student, teacher = (spaced_timesteps(schedule, n, "trailing") for n in (steps, teacher_steps))
    if not torch.equal(teacher[::teacher_steps // steps], student):
        raise ConfigError(f"{steps} student steps do not fall on {teacher_steps} teacher steps of a "
                          f"{schedule.timesteps}-step schedule; choose steps that divide it")
    return student, teacher


@torch.no_grad()
def teacher_points(teacher: Callable[[torch.Tensor], EpsModel], z: torch.Tensor, j: torch.Tensor,
                   schedule: NoiseSchedule, student: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Where the teacher's DDIM steps take each image z[i] from the student's step j[i] to its next (the clean image
    after the last). teacher(rows) is the teacher's ε-model for those rows of the batch (their classes)."""
    k, z_to = len(fine) // len(student), torch.empty_like(z)
    for step in j.unique().tolist():
        rows = (j == step).nonzero().flatten()
        end = student[step + 1] if step + 1 < len(student) else None
        z_to[rows] = ddim(teacher(rows), z[rows], schedule, fine[k * step:k * (step + 1)], end=end).to(z.dtype)
    return z_to


def distill_loss(student: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 teacher: Callable[[torch.Tensor], EpsModel], objective: Objective, schedule: NoiseSchedule,
                 x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The student's loss on a batch: each image noised to the student's step j = t·steps/T (t uniform in [0, T):
    every step equally often), the teacher's steps from there to step j + 1, and the MSE of the student's output
    against x̃ in its objective (which weighs x̃'s error as the objective does: v by SNR + 1). grid: grids(), made
    once for a run."""
    student_steps, fine = grid
    j = (t.cpu() * len(student_steps)).div(schedule.timesteps, rounding_mode="floor")
    t_from = student_steps[j].to(t.device)
    z = schedule.q_sample(x0, t_from, eps)
    z_to = teacher_points(teacher, z, j, schedule, student_steps, fine)
    ab = schedule.alpha_bar_at(student_steps).double()
    after = torch.cat([ab[1:], torch.ones(1, dtype=ab.dtype)])  # ᾱ after each step: the next one's, or 1 (clean)
    shape = (-1,) + (1,) * (z.ndim - 1)
    ab_from, ab_to = (a[j].to(z.device, z.dtype).view(shape) for a in (ab, after))
    x_tilde = student_target(z, z_to, ab_from, ab_to)
    eps_tilde = (z - ab_from.sqrt() * x_tilde) / (1 - ab_from).sqrt()
    out = student(z, t_from).float()
    return (out - target(objective, schedule, x_tilde, t_from, eps_tilde)).square().mean()

