"""A distillation run: the training loop with a teacher's loss (diffusion/distillation.py) in place of the diffusion
loss. The student starts as the teacher's weights and learns to take in one DDIM step what the teacher takes in
several (teacher_steps / steps of them), guided as asked where the model has classes, so that it samples in
`steps` network calls. Everything else is a training run's: the run folder, resume, --max-time, Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..diffusion.denoiser import Denoiser
from ..diffusion.distillation import distill_loss, grids
from ..diffusion.objectives import preconditioned
from ..diffusion.schedule import NoiseSchedule
from ..errors import CheckpointError
from ..formats.checkpoint import load_model
from .step import LossFn


def load_teacher(config: Config, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The teacher's network (its EMA weights, in eval mode) on `device`, from the file the run records, and its
    config (a distilled teacher's says so: it is sampled as the student it is)."""
    path = Path(config.distill.teacher)
    if not path.exists():
        raise CheckpointError(f"{path}: the teacher of this distillation is not there any more; put it back to resume")
    net, saved, _ = load_model(path, device)
    if saved.model != config.model or saved.diffusion != config.diffusion:
        raise CheckpointError(f"{path} is not the model this run distills (its network or forward process differs)")
    return net.eval().requires_grad_(False), saved


def teacher_loss(config: Config, teacher: torch.nn.Module, teacher_config: Config, schedule: NoiseSchedule,
                 precision: str) -> LossFn:
    """The student's loss against `teacher` (diffusion/distillation.distill_loss), guided by the run's guidance for a
    conditional model's classes (its "no class" label is not guided); a distilled teacher has its guidance in its
    weights, and is sampled unclipped, as a student is."""
    d = config.distill
    denoiser = Denoiser(teacher, teacher_config, precision)  # sampled as the teacher it is
    guidance = 1.0 if teacher_config.distill is not None else d.guidance
    grid = grids(schedule, d.steps, d.teacher_steps)

    def loss(net: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             labels: torch.Tensor | None) -> torch.Tensor:
        called = preconditioned(net, config.diffusion.objective, schedule)

        def student(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            return called(x, steps) if labels is None else called(x, steps, labels)

        def guided(rows: torch.Tensor):
            return denoiser.eps_model(len(rows), None if labels is None else labels[rows], guidance)

        return distill_loss(student, guided, config.diffusion.objective, schedule, x0, t, eps, grid)
    return loss
