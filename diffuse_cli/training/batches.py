"""A training step's inputs: which images (epochs as seeded permutations), their noise, steps, flips and classes,
written into the step's tensors, for this process's share of the global batch; every draw seeded by (seed, step,
micro-batch), so that a resumed run draws what the whole run would have."""

from __future__ import annotations

import torch

from . import distributed
from ..config import Config
from ..diffusion.objectives import training_steps
from ..diffusion.pixels import to_model
from ..diffusion.schedule import NoiseSchedule
from ..images.data import ImageData, ReadAhead
from ..network.device import mix_seed
from ..network.fast_ops import to_device
from .step import StepTensors


def batch_indices(step: int, micro: int, cfg: Config, n: int, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """Dataset indices of one global micro-batch: epochs are seeded permutations, read in order."""
    B = cfg.train.batch_size
    first = (step * cfg.train.grad_accum + micro) * B
    positions = torch.arange(first, first + B)
    epochs = positions // n
    for e in epochs.unique().tolist():
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(cfg.train.seed, 1, e)))
    for e in list(perms):
        if e < epochs.min().item():
            del perms[e]
    indices = torch.empty(B, dtype=torch.long)
    for e in epochs.unique().tolist():  # at most two epochs meet in one batch
        here = epochs == e
        indices[here] = perms[e][(positions % n)[here]]
    return indices


class Batches:
    """Each step's images, noise, steps and flips, written into the step's tensors; this process's share."""

    def __init__(self, data: ImageData, config: Config, schedule: NoiseSchedule, world: distributed.World,
                 device: torch.device):
        self.config, self.schedule, self.device, self.n = config, schedule, device, len(data)
        local = config.train.batch_size // world.size
        self.mine = slice(world.rank * local, (world.rank + 1) * local)
        self.rank, self.perms = world.rank, {}
        on_gpu = (data.images is not None and device.type == "cuda"
                  and data.images.numel() < torch.cuda.mem_get_info(device)[0] // 4)
        self.images = data.images.to(device) if on_gpu else data.images  # uint8 on the GPU: no host copies
        # decoded on demand, or mapped from the cache (whose pages may have to come from disk): a batch ahead
        self.read_ahead = ReadAhead(data) if self.images is None or (data.mapped and not on_gpu) else None
        self.labels = None  # each image's class for the model: its index, or "no class" (len(classes))
        if config.model.class_names:
            null = len(config.model.class_names)
            labels = data.labels if data.labels is not None else torch.full((self.n,), -1, dtype=torch.long)
            self.labels = torch.where(labels >= 0, labels, null).to(device)

    def fill(self, step: int, io: StepTensors, last: bool) -> None:
        """Step `step`'s inputs into io: every draw seeded by (seed, step, micro-batch); unless this is
        the `last` step, start decoding the next step's images (when they are decoded on demand)."""
        tc, m = self.config.train, self.config.model
        for micro in range(tc.grad_accum):
            g = torch.Generator(self.device).manual_seed(mix_seed(tc.seed, 2, step, micro))
            t = training_steps(self.config.diffusion.objective, self.schedule, tc.batch_size, g, self.device)
            eps = torch.randn((tc.batch_size, m.channels, m.image_size, m.image_size), generator=g, device=self.device)
            flip = torch.rand(tc.batch_size, generator=g, device=self.device) < (0.5 if tc.hflip else 0.0)
            idx = batch_indices(step, micro, self.config, self.n, self.perms)[self.mine]
            if self.read_ahead is None:
                pixels = self.images[to_device(idx, self.images.device)]
            else:
                pixels = self.read_ahead.get((step, micro), idx)
            x0 = to_model(to_device(pixels, self.device))  # uint8 over the bus, a quarter of the bytes
            io.x0[micro].copy_(torch.where(flip[self.mine, None, None, None], x0.flip(-1), x0))
            io.t[micro].copy_(t[self.mine])
            io.eps[micro].copy_(eps[self.mine])
            if self.labels is not None:  # drawn last, so that an unconditional run's draws are as they were
                dropped = torch.rand(tc.batch_size, generator=g, device=self.device) < tc.class_dropout
                labels = self.labels[to_device(idx, self.labels.device)]
                io.labels[micro].copy_(torch.where(dropped[self.mine], len(self.config.model.class_names), labels))
        torch.manual_seed(mix_seed(tc.seed, 3, step, self.rank))  # dropout; a CUDA graph reads the seed at replay
        if self.read_ahead is not None and not last:  # decode the next step's images during this one
            for micro in range(tc.grad_accum):
                idx = batch_indices(step + 1, micro, self.config, self.n, self.perms)[self.mine]
                self.read_ahead.fetch((step + 1, micro), idx)
