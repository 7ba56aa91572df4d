"""What a training step holds in memory, estimated before the first step, and the micro-batch that fits.

A batch that does not fit is split into micro-batches whose gradients add up to the same step (gradient
accumulation): the effective batch, and so what the model learns, stays as asked. Without this, a step too large
stops the run with CUDA's out-of-memory error, or on the CPU gets the process killed by the system without a word.

    fixed        weights, their gradients, AdamW's two moments and the EMA: 5 fp32 copies of the parameters;
                 under 16-bit autocast, the 16-bit copy of the weights it casts once per step
    per image    what the forward keeps for the backward (every saved tensor, counted by torch's saved-tensor
                 hooks over a forward of one image and of two on the run's own device and precision: the
                 difference is per image), and the step's inputs
    transient    the backward's gradients of those activations in flight and the allocator's slack: a
                 quarter of the first GB kept, a twentieth of the rest (TRANSIENT)
    checkpointing  each residual block keeps only its input; one block's activations at a time are recomputed

The estimate is checked against the measured peak by benchmarks/presets.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import Config
from ..errors import Note, TrainingFailed
from ..network.device import autocast
from ..network.unet import UNet
from . import distributed
from .distributed import World

# Bytes of fp32 state per parameter: the weight, its gradient, AdamW's exp_avg and exp_avg_sq, and the EMA copy.
STATE_BYTES_PER_PARAMETER = 20
# The backward holds, besides what the forward saved, gradients of the activations it walks back through and
# the allocator's slack: measured over the presets at 32 to 256 px (benchmarks/presets.py), a quarter of what
# is saved in a small step (tiny to base at 32-64 px: 0.22-0.37) and far less of a large one (base and large at
# 128-256 px: 0.04-0.07), so a quarter of the first GB saved and a twentieth of the rest.
TRANSIENT = ((1 << 30, 0.25), (None, 0.05))
# The allocator's and the kernels' scratch, whatever the network (measured: tiny at 32 px).
WORKSPACE = 8 << 20
# Of the memory a device reports free, what a run may plan to use: the rest is the allocator's fragmentation,
# CUDA's workspaces and, on the CPU, everything else the machine runs.
USABLE = 0.9


@dataclass(frozen=True)
class StepMemory:
    """A training step's peak memory, in bytes, for a micro-batch of any size (need)."""

    fixed: int
    saved_per_image: int  # kept for the backward
    inputs_per_image: int  # the step's own tensors: x0, noise, x_t

    def need(self, batch: int) -> int:
        saved = batch * self.saved_per_image
        transient, rest = 0.0, saved
        for span, share in TRANSIENT:
            part = rest if span is None else min(rest, span)
            transient, rest = transient + share * part, rest - part
        return self.fixed + batch * self.inputs_per_image + saved + round(transient)

    def fitting_batch(self, batch: int, available: int) -> int | None:
        """The largest divisor of `batch` whose step fits in `available` bytes (so that micro-batches of it add
        up to the batch exactly); None when not even one image fits."""
        for micro in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
            if self.need(micro) <= USABLE * available:
                return micro
        return None


def fit_batch(config: Config, model: UNet, precision: str, checkpointing: bool, world: World,
              available: int) -> tuple[Config, str | None]:
    """The config with its batch split into micro-batches (more gradient accumulation, the same effective batch)
    where a step of it would not fit in `available` bytes of the model's device, and the note that says so.
    Raises TrainingFailed when not even one image a step fits."""
    tc, m = config.train, config.model
    local = tc.batch_size // world.size
    memory = step_memory(model, config, precision, checkpointing)
    micro = distributed.smallest(memory.fitting_batch(local, available) or 0, world)
    where = "the GPU" if next(model.parameters()).device.type == "cuda" else "memory"
    if micro == 0:
        hint = "" if checkpointing else "{checkpointing}, "
        raise TrainingFailed(f"a training step of one {m.image_size}x{m.image_size} image needs about "
                             f"{_gb(memory.need(1))} and {where} has {_gb(available)} free; try {hint}a smaller "
                             "{image_size} or {preset}", "checkpointing", "image_size", "preset")
    if micro == local:
        return config, None
    k = local // micro
    lowered = replace(config, train=replace(tc, batch_size=micro * world.size, grad_accum=tc.grad_accum * k))
    return lowered, Note(f"note: a step of batch {tc.batch_size} at {m.image_size}x{m.image_size} needs about "
                     f"{_gb(memory.need(local))} and {where} has {_gb(available)} free: training in {k}x more "
                     f"micro-batches of {micro * world.size} (gradient accumulation), the same effective batch of "
                     f"{tc.batch_size * tc.grad_accum}" + ("" if checkpointing else "; {checkpointing} fits more"),
                         "checkpointing")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def step_memory(model: UNet, config: Config, precision: str, checkpointing: bool = False) -> StepMemory:
    """Estimate a training step's memory for `model` (on its device, in `precision`): see the module's table."""
    one, two = (_saved_bytes(model, config, batch, precision, checkpointing) for batch in (1, 2))
    per_image, fixed_saved = two - one, max(0, 2 * one - two)
    params = sum(p.numel() for p in model.parameters())
    cast = 2 * params if precision in ("bf16", "fp16") else 0
    inputs = 3 * 4 * config.model.channels * config.model.image_size ** 2  # x0, noise and x_t in fp32
    return StepMemory(STATE_BYTES_PER_PARAMETER * params + cast + fixed_saved + WORKSPACE, per_image, inputs)


def _saved_bytes(model: UNet, config: Config, batch: int, precision: str, checkpointing: bool) -> int:
    """Bytes of the tensors a forward of `batch` images saves for its backward, parameters aside, each storage
    counted once. With checkpointing: what the checkpointed forward keeps (each block's input) plus the most
    any one block saves while it is recomputed."""
    device, m = next(model.parameters()).device, config.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    per_block: dict[int, int] = {}
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr not in params and size:
            if checkpointing and current:
                per_block[current[-1]] = per_block.get(current[-1], 0) + size
            else:
                kept[ptr] = size
        return t

    hooks = []
    if checkpointing:  # a checkpointed block keeps its input; what it saves inside is counted per block
        for i, block in enumerate(model.checkpointed_blocks()):
            def enter(module, args, i=i):
                current.append(i)
                kept[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

            def leave(module, args, out):
                current.pop()  # and return None: a forward hook's result would replace the block's output

            hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    x = torch.zeros(batch, m.channels, m.image_size, m.image_size, device=device)
    t = torch.zeros(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if m.class_names else None
    was_training, was_checkpointing = model.training, model.checkpointing
    model.train().checkpointing = False  # counted as if recomputed: hooks see each block once, as it runs
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
            model(x, t, labels)  # dropout draws from a forked generator: the run's own draws are untouched
    finally:
        model.train(was_training)
        model.checkpointing = was_checkpointing
        for hook in hooks:
            hook.remove()
    return sum(kept.values()) + (max(per_block.values(), default=0) if checkpointing else 0)
