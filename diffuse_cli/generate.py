"""Images from a trained network: the objective adapter, per-image seeds, batching, precision."""

from __future__ import annotations

from typing import Callable, Generator

import torch

from . import threads
from .config import Config, Precision, Threshold
from .data import to_model, to_uint8
from .device import autocast, layout_of, mix_seed, resolve_precision
from .editing import Plan, edit, plan_edit
from .errors import UsageError
from .graphs import graphed_forward
from .fast_ops import to_device
from .objectives import EpsModel, as_eps_model, guided
from .pictures import make_grid
from .samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, Callback, sample, spaced_timesteps
from .schedule import NoiseSchedule
from .unet import layer_outputs

# Sampling holds about this many bytes per element of the network's layer outputs (unet.layer_outputs), having
# no backward to keep them for: a margin over what was measured, since running out kills the process.
SAMPLE_BYTES_PER_OUTPUT = 1.5


def fitting_batch(model: torch.nn.Module, batch_size: int, available: int) -> int:
    """The largest batch, up to batch_size and at least 1, whose sampling fits in `available` bytes."""
    per_image = SAMPLE_BYTES_PER_OUTPUT * layer_outputs(model, 1)
    return max(1, min(batch_size, int(available // per_image)))


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One generator per image: image i always gets the noise of seed + i, whatever the batching."""
    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + count)]


def random_classes(seed: int, n: int, classes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """A class for each of n images, image i's from its own seed (so independent of the batching), drawn with
    `weights` (one a class, then one for "no class"; None: classes equally).

    A conditional model's "no class" half learns only from the images whose label was dropped in
    training, and draws worse images than its classes do: a class drawn as often as the data has it,
    then the conditional model, draws the data as a whole (p(x) = Σ_c p(c) p(x | c)) better."""
    weights = torch.ones(classes) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    draws = [torch.multinomial(weights.double(), 1, generator=torch.Generator().manual_seed(mix_seed(seed + i, 5)))
             for i in range(n)]
    return torch.cat(draws)


class Denoiser:
    """A trained network as the samplers' ε-model: in its precision and memory layout, replayed as a CUDA graph
    on CUDA (unless cuda_graph=False, or its capture fails: `log` says so), its objective adapted, and for a
    conditional model, guided towards the classes asked."""

    def __init__(self, model: torch.nn.Module, config: Config, precision: Precision = "fp32",
                 cuda_graph: bool = True, log: Callable[[str], None] = lambda message: None):
        self.config, self.device = config, next(model.parameters()).device
        precision = resolve_precision(precision, self.device)  # 'auto' as training picks it; fp16 only on GPUs
        layout = layout_of(model)  # training chose it (device.memory_format); inputs follow the weights
        self.schedule = NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)

        on_cpu = self.device.type == "cpu"

        def network(x: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
            if on_cpu:
                threads.tick()  # the CPU thread count follows the machine (threads.py; not in its workers)
            with autocast(precision, self.device):
                return model(x.contiguous(memory_format=layout), t, *y)
        fallback = lambda why: log(f"CUDA graph capture failed ({why}); sampling on without it")  # noqa: E731
        self.net = graphed_forward(network, fallback) if cuda_graph and self.device.type == "cuda" else network

    def eps_model(self, count: int, labels: torch.Tensor | None = None, guidance: float = 1.0, clip_x0: bool = True,
                  threshold: Threshold = "clip") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The ε-model for a batch of `count` images of classes `labels` (None: no class asked)."""
        classes, net = self.config.model.class_names, self.net
        if labels is not None and not classes:
            raise UsageError("this model was trained without classes; sample it without --class")
        if classes:
            y = torch.full((count,), len(classes)) if labels is None else labels.long()
            net = guided(net, to_device(y, self.device), len(classes), guidance)
        return as_eps_model(net, self.schedule, self.config.diffusion.objective, clip_x0, dynamic=threshold == "dynamic")


@torch.no_grad()
def generate_batches(model: torch.nn.Module, config: Config, n: int, *, sampler: str = DEFAULT_SAMPLER,
                     steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = 64, spacing: str | None = None,
                     precision: Precision = "fp32", clip_x0: bool = True, labels: torch.Tensor | None = None,
                     guidance: float = 1.0, threshold: Threshold = "clip", class_weights: torch.Tensor | None = None,
                     init: torch.Tensor | None = None, strength: float = 1.0, generate: torch.Tensor | None = None,
                     resample_jumps: int = 0, progress: Callable[[int, int], None] | None = None,
                     callback: Callback | None = None, cuda_graph: bool = True,
                     log: Callable[[str], None] = lambda message: None, **options) -> Generator[torch.Tensor, None, int]:
    """n images as uint8 (count, C, H, W) batches, in order, each as soon as it is sampled (and at the end, as
    the generator's value, the network calls a batch took: calls_per_batch); on
    CUDA each network call replays a CUDA graph unless cuda_graph=False (or its capture fails:
    `log` says so). A conditional model draws image i of class labels[i] (len(class_names): no
    class), with classifier-free guidance of weight `guidance`; with no labels asked, each image's class
    is drawn (random_classes), so that the images follow the data as a whole. Image i edits init[i]
    (uint8, n of them) when given: SDEdit at `strength`, and where `generate` (bool (n, 1, H, W)) is given,
    inpainting there with RePaint's `resample_jumps` (editing.py)."""
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    denoiser = Denoiser(model, config, precision, cuda_graph, log)
    if labels is None and config.model.class_names:
        labels, guidance = random_classes(seed, n, len(config.model.class_names), class_weights), 1.0
    plan = None if init is None else edit_plan(denoiser.schedule, sampler, steps, spacing, strength,
                                               generate is not None, resample_jumps)
    per_batch = calls_per_batch(sampler, steps, plan)
    calls = CallCounter(per_batch * -(-n // batch_size), progress)
    c, s = config.model.channels, config.model.image_size

    def draw(start: int, count: int, share: float = 1.0) -> torch.Tensor:
        """Images start .. start + count of the request, in the model's range."""
        eps_model = calls.wrap(denoiser.eps_model(count, None if labels is None else labels[start:start + count],
                                                  guidance, clip_x0, threshold), share)
        generators = image_generators(seed, start, count)
        if plan is None:
            return sample(eps_model, (count, c, s, s), denoiser.schedule, sampler, steps, generators, spacing=spacing,
                          device=denoiser.device, callback=callback, **options)
        rows = slice(start, start + count)
        mask = None if generate is None else to_device(generate[rows], denoiser.device)
        return edit(sampler, eps_model, to_device(to_model(init[rows]), denoiser.device), denoiser.schedule, plan,
                    mask, generators, callback, **options)

    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        parts = threads.worker_parts(count) if denoiser.device.type == "cpu" and callback is None else 1
        if parts == 1:
            x = draw(start, count)
        else:  # each image from its own seed: the same images, to rounding, whoever draws them
            x = threads.in_workers(draw, [(start + lo, hi - lo, 1 / parts) for lo, hi in threads.split(count, parts)])
        yield to_uint8(x).cpu()
    return per_batch


def calls_per_batch(sampler: str, steps: int, plan: Plan | None = None) -> int:
    """Network calls one batch takes: the sampler's on `steps`, or those of an edit's path (editing.Plan)."""
    return SAMPLERS[sampler].nfe(steps) if plan is None else plan.nfe(sampler)


class CallCounter:
    """Counts network calls over a whole request, every batch of it, and reports (done, total) to `progress`."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None = None):
        self.total, self.progress, self.done = total, progress, 0

    def wrap(self, eps_model: EpsModel, share: float = 1.0) -> EpsModel:
        """eps_model, counted as `share` of a call each time (a part of a batch drawn in a worker: threads.py)."""
        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.done += share
            if self.progress:
                self.progress(self.done, self.total)
            return eps_model(x, t)
        return counted


def edit_plan(schedule: NoiseSchedule, sampler: str, steps: int, spacing: str | None, strength: float,
              inpaint: bool, jumps: int) -> Plan:
    """The path an edit with these settings takes (editing.Plan)."""
    timesteps = spaced_timesteps(schedule, steps, spacing or SAMPLERS[sampler].spacing)
    return plan_edit(timesteps, schedule.timesteps, strength, inpaint, jumps)


def generate(model: torch.nn.Module, config: Config, n: int, **kwargs) -> tuple[torch.Tensor, int]:
    """n images as uint8 (n, C, H, W) and the network calls (NFE) per batch; keyword arguments
    as generate_batches."""
    batches, images = generate_batches(model, config, n, **kwargs), []
    while True:
        try:
            images.append(next(batches))
        except StopIteration as finished:  # its value: the calls a batch took, an edit's path included
            return torch.cat(images), finished.value


class Trajectory:
    """A sampling callback that keeps x_t and the predicted x_0 of the first image at every step of the
    first batch, for a strip (10 steps: x_t above, x̂_0 below) and an animation."""

    def __init__(self) -> None:
        self.frames: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.full = False

    def __call__(self, i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        self.full = self.full or (i == 0 and bool(self.frames))  # step 0 again: a second batch
        if not self.full:
            self.frames.append((to_uint8(x_t[0]).cpu(), to_uint8(x0[0]).cpu()))

    def strip(self, columns: int = 10) -> torch.Tensor:
        """x_t (top row) and x̂_0 (bottom row) at `columns` evenly spaced steps: one uint8 (C, H, W) image."""
        picks = sorted({round(k * (len(self.frames) - 1) / (columns - 1)) for k in range(columns)})
        return make_grid(torch.stack([self.frames[k][0] for k in picks] + [self.frames[k][1] for k in picks]),
                         nrow=len(picks))

    def animation(self) -> list[torch.Tensor]:
        """One uint8 (C, H, W) frame a step: x_t beside x̂_0."""
        return [make_grid(torch.stack(pair), nrow=2) for pair in self.frames]
