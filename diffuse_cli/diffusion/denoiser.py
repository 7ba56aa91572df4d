"""The denoiser: a trained network as the samplers' ε-model (its objective adapted, its precision, guidance),
and images drawn with it, batch by batch, each from its own seed."""

from __future__ import annotations

from typing import Callable, Generator

import torch

from ..network import threads
from ..config import Config, Precision, Threshold
from ..images.data import to_model, to_uint8
from ..network.device import autocast, layout_of, mix_seed, resolve_precision
from .editing import Plan, edit, plan_edit
from ..errors import UsageError
from ..network.graphs import graphed_forward
from ..network.fast_ops import to_device
from .objectives import as_eps_model, guided
from .samplers import CallCounter, Callback, sample
from .sampling import Request, SampleConfig
from .schedule import NoiseSchedule
from ..network.unet import layer_outputs

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
def generate_batches(model: torch.nn.Module, config: Config, n: int, settings: SampleConfig = SampleConfig(),
                     request: Request | None = None, class_weights: torch.Tensor | None = None,
                     progress: Callable[[float, int], None] | None = None, callback: Callback | None = None,
                     cuda_graph: bool = True, log: Callable[[str], None] = lambda message: None
                     ) -> Generator[torch.Tensor, None, int]:
    """n images as uint8 (count, C, H, W) batches of settings.batch_size, in order, each as soon as it is sampled
    (and at the end, as the generator's value, the network calls a batch took); on CUDA each network call
    replays a CUDA graph unless cuda_graph=False (or its capture fails: `log` says so). A conditional model
    draws image i of class request.labels[i] (len(class_names): no class), with classifier-free guidance of
    weight settings.guidance; with no labels asked, each image's class is drawn (random_classes, guidance 1),
    so that the images follow the data as a whole. Image i edits request.init[i] (uint8) when given: SDEdit at
    settings.strength, and where request.generate (bool (n, 1, H, W)) is given, inpainting there with
    RePaint's settings.resample_jumps (editing.py). settings is checked by the caller (SampleConfig.check)."""
    how, seed, batch_size, guidance = settings.sampler, settings.seed, settings.batch_size, settings.guidance
    labels, init, generate = (None, None, None) if request is None else (request.labels, request.init, request.generate)
    denoiser = Denoiser(model, config, how.precision, cuda_graph, log)
    if labels is None and config.model.class_names:
        labels, guidance = random_classes(seed, n, len(config.model.class_names), class_weights), 1.0
    plan = None if init is None else edit_plan(denoiser.schedule, settings, generate is not None)
    per_batch = how.nfe() if plan is None else plan.nfe(how.name)
    calls = CallCounter(per_batch * -(-n // batch_size), progress)
    c, s = config.model.channels, config.model.image_size

    def draw(start: int, count: int, share: float = 1.0) -> torch.Tensor:
        """Images start .. start + count of the request, in the model's range."""
        eps_model = calls.wrap(denoiser.eps_model(count, None if labels is None else labels[start:start + count],
                                                  guidance, threshold=how.threshold), share)
        generators = image_generators(seed, start, count)
        if plan is None:
            return sample(eps_model, (count, c, s, s), denoiser.schedule, how.name, how.steps, generators,
                          spacing=how.spacing, device=denoiser.device, callback=callback, **how.options())
        rows = slice(start, start + count)
        mask = None if generate is None else to_device(generate[rows], denoiser.device)
        return edit(how.name, eps_model, to_device(to_model(init[rows]), denoiser.device), denoiser.schedule, plan,
                    mask, generators, callback, **how.options())

    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        parts = threads.worker_parts(count) if denoiser.device.type == "cpu" and callback is None else 1
        if parts == 1:
            x = draw(start, count)
        else:  # each image from its own seed: the same images, to rounding, whoever draws them
            x = threads.in_workers(draw, [(start + lo, hi - lo, 1 / parts) for lo, hi in threads.split(count, parts)])
        yield to_uint8(x).cpu()
    return per_batch


def edit_plan(schedule: NoiseSchedule, settings: SampleConfig, inpaint: bool) -> Plan:
    """The path an edit with these settings takes (editing.Plan)."""
    return plan_edit(settings.sampler.timesteps(schedule), schedule.timesteps, settings.strength, inpaint,
                     settings.resample_jumps)


def generate(model: torch.nn.Module, config: Config, n: int, labels: torch.Tensor | None = None,
             init: torch.Tensor | None = None, generate: torch.Tensor | None = None,
             progress: Callable[[float, int], None] | None = None, callback: Callback | None = None,
             cuda_graph: bool = True, log: Callable[[str], None] = lambda message: None,
             **settings) -> tuple[torch.Tensor, int]:
    """n images as uint8 (n, C, H, W) and the network calls (NFE) per batch: generate_batches, its settings
    by name (SampleConfig.of) and its request as each image's class, init and mask."""
    request = Request(labels, None, None, None, init, generate)
    batches = generate_batches(model, config, n, SampleConfig.of(**settings).check(config.diffusion.timesteps),
                               request, None, progress, callback, cuda_graph, log)
    images = []
    while True:
        try:
            images.append(next(batches))
        except StopIteration as finished:  # its value: the calls a batch took, an edit's path included
            return torch.cat(images), finished.value
