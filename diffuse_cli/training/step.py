"""One optimizer step, all on the device: what the training loop repeats and a CUDA graph captures.

The step reads its inputs from tensors at fixed addresses (StepTensors) and never makes the host
wait for the device, so a GPU's queue never drains. It also holds the schedules the loop sets
before each step: the learning rate and the EMA decay.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import Config, TrainConfig
from ..network.device import autocast
from ..network.fast_ops import ema_update, step_unless
from ..diffusion.objectives import diffusion_loss
from ..diffusion.schedule import NoiseSchedule

# (network, x0, t, ε, labels or None) -> the loss of a micro-batch
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def lr_at(step: int, tc: TrainConfig, progress: float | None) -> float:
    """Linear warm-up over tc.warmup steps, then constant, or cosine decay to 10% as `progress` (the share of
    the steps or time after the warm-up: budget.Budget.progress) goes from 0 to 1 (None: not begun)."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.lr_schedule == "constant" or progress is None:
        return tc.lr
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step: int, tc: TrainConfig) -> float:
    """EMA warm-up of Karras et al.: 1 - (1 + step)^-power, capped; early steps follow the weights closely."""
    return min(tc.ema_max_decay, 1 - (1 + step) ** -tc.ema_power)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has one (CUDA, CPU; the CPU's default is a per-tensor loop).
    `capturable` (CUDA): the learning rate lives on the GPU, so that a CUDA graph can replay the step."""
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99),
                                  fused=fused or None, capturable=capturable)
    if capturable:
        lr = torch.tensor(tc.lr, device=next(model.parameters()).device)
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a captured graph reads it from there
        else:
            group["lr"] = lr


@dataclass
class StepTensors:
    """What one optimizer step reads and writes, at fixed addresses, so that a CUDA graph captured
    once replays every later step. The host fills the inputs; it reads the outputs only to log."""

    x0: list[torch.Tensor]   # per micro-batch: clean images, (local batch, C, H, W)
    t: list[torch.Tensor]    # per micro-batch: steps, (local batch,)
    eps: list[torch.Tensor]  # per micro-batch: the noise, like x0
    ema_weight: torch.Tensor  # (): 1 - EMA decay
    loss_sum: torch.Tensor    # (): summed loss of the finite steps since the last log
    bad: torch.Tensor         # (3,): non-finite steps: the current run, the longest run and the total since the last log
    labels: list[torch.Tensor] | None = None  # per micro-batch: class indices, (local batch,); None: unconditional
    average_weights: torch.Tensor | None = None  # (averages,): 1 - each post-hoc EMA average's decay this step

    @classmethod
    def allocate(cls, config: Config, batch: int, device: torch.device, layout: torch.memory_format) -> "StepTensors":
        m = config.model
        image = lambda: torch.zeros(batch, m.channels, m.image_size, m.image_size,  # noqa: E731
                                    device=device).contiguous(memory_format=layout)
        k = config.train.grad_accum
        steps = lambda: torch.zeros(batch, dtype=torch.long, device=device)  # noqa: E731
        return cls([image() for _ in range(k)], [steps() for _ in range(k)],
                   [image() for _ in range(k)], torch.zeros((), device=device), torch.zeros((), device=device),
                   torch.zeros(3, device=device), [steps() for _ in range(k)] if m.class_names else None,
                   torch.zeros(len(config.train.posthoc_ema), device=device))


def optimizer_step(net: torch.nn.Module, model: torch.nn.Module, ema: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: Config,
                   schedule: NoiseSchedule, precision: str, io: StepTensors, loss_fn: LossFn | None = None,
                   averages: Sequence[torch.nn.Module] = ()) -> None:
    """One step on the micro-batches in io: forward, backward, clip, AdamW, EMA and post-hoc EMA's `averages`, all
    on the device. The loss is the diffusion loss, or `loss_fn(net, x0, t, eps, labels)` (a distillation's).

    A step whose loss or gradient is not finite changes no weight and no optimizer moment, only
    the counters in io.bad."""
    tc = config.train
    loss_step = torch.zeros((), device=io.ema_weight.device)
    for micro in range(tc.grad_accum):
        defer_sync = micro < tc.grad_accum - 1 and hasattr(net, "no_sync")  # DDP: all-reduce once, at the end
        with (net.no_sync() if defer_sync else contextlib.nullcontext()), autocast(precision, io.x0[micro].device):
            labels = None if io.labels is None else io.labels[micro]
            loss = (diffusion_loss(net, config.diffusion.objective, schedule, io.x0[micro], io.t[micro],
                                   io.eps[micro], tc.min_snr_gamma, labels) if loss_fn is None
                    else loss_fn(net, io.x0[micro], io.t[micro], io.eps[micro], labels))
        scaler.scale(loss / tc.grad_accum).backward()
        loss_step += loss.detach() / tc.grad_accum

    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    finite = torch.isfinite(loss_step)
    if scaler.is_enabled():  # fp16: the scaler skips steps whose gradients overflowed, and shrinks its scale
        scaler.step(optimizer)
        scaler.update()
    else:
        finite &= torch.isfinite(grad_norm)
        step_unless(optimizer, ~finite)
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema, model, io.ema_weight * finite)
    for i, average in enumerate(averages):  # a skipped step left the weights as they were: they are averaged in
        ema_update(average, model, io.average_weights[i])
    io.loss_sum.add_(torch.where(finite, loss_step, 0.0))
    count_bad(io.bad, ~finite)


def count_bad(bad: torch.Tensor, is_bad: torch.Tensor) -> None:
    """Update (current run, longest run, total) of non-finite steps in place."""
    run = (bad[0] + 1) * is_bad
    bad.copy_(torch.stack([run, torch.maximum(bad[1], run), bad[2] + is_bad]))
