"""The sampling pipeline, which every drawing goes through: `diffuse sample` and edits, the training grid and FID,
eval, the time slider and interpolation.

A caller asks with a Request, laid out and checked once (request()), and hears of the work through one SampleHooks.
The Denoiser puts a trained network behind the samplers' ε-model contract (its objective adapted, its precision,
guidance) and does every kind of drawing: images from noise or from an edit, batch by batch, each from its own
seed (draw), and walks from a given x over given steps (walk, invert).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Generator

import torch

from ..config import Config, Precision, SamplerName, Threshold
from ..errors import UsageError
from ..network import threads
from ..network.device import autocast, layout_of, mix_seed, resolve_precision
from ..network.fast_ops import to_device
from ..network.graphs import graphed_forward
from ..network.unet import layer_outputs
from .editing import Plan, ddim_invert, edit, plan_edit
from .objectives import as_eps_model, guided
from .pixels import to_model, to_uint8
from .samplers import SAMPLERS, CallCounter, Callback, sample
from .sampling import SampleConfig, SamplerChoice
from .schedule import NoiseSchedule

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


@dataclass(frozen=True)
class SampleHooks:
    """How a drawing talks to its caller, as training's Hooks do: `progress(done, total)` after each network call
    (a part of a call where a batch is split over threads), `callback(i, x_t, x̂_0)` at each sampler step, `log` for
    messages (a CUDA graph's capture that failed), and whether each network call replays a CUDA graph on CUDA."""

    progress: Callable[[float, int | None], None] | None = None
    callback: Callback | None = None
    log: Callable[[str], None] = lambda message: None
    cuda_graph: bool = True


@dataclass(frozen=True)
class Request:
    """A drawing asked for, laid out and checked (request()): its settings, with the guidance that applies, and each
    image's class index (len(class_names): no class; None: an unconditional model), init and where to generate."""

    settings: SampleConfig
    total: int
    labels: torch.Tensor | None = None
    init: torch.Tensor | None = None
    generate: torch.Tensor | None = None

    def plan(self, schedule: NoiseSchedule) -> Plan | None:
        """The path an edit takes (editing.Plan); None for drawing from noise."""
        if self.init is None:
            return None
        s = self.settings
        return plan_edit(s.sampler.timesteps(schedule), schedule.timesteps, s.strength, self.generate is not None,
                         s.jumps())

    def nfe(self, schedule: NoiseSchedule) -> int:
        """Network calls a batch takes (each on the batch twice over where it is guided)."""
        plan = self.plan(schedule)
        return self.settings.sampler.nfe() if plan is None else plan.nfe(self.settings.sampler.name)


def class_labels(config: Config, classes: tuple[str, ...], n: int) -> torch.Tensor | None:
    """The class index of each image a request draws: n of each class asked, class by class (None: none asked). A
    class is named, or given by its index; 'all' is every class."""
    names = config.model.class_names
    if not classes:
        return None
    if not names:
        raise UsageError("this model was trained without classes; sample it without {classes} (train on a folder "
                         "of subfolders, one a class, for a model that has them)", "classes")
    if "all" in classes:
        picked = list(range(len(names)))
    else:
        picked = []
        for asked in classes:
            if asked in names:
                picked.append(names.index(asked))
            elif asked.isdigit() and int(asked) < len(names):
                picked.append(int(asked))
            else:
                raise UsageError(f"unknown class {asked!r}; this model's classes are: {', '.join(names)}")
    return torch.tensor(picked).repeat_interleave(n)


def request(config: Config, n: int, settings: SampleConfig = SampleConfig(), labels: torch.Tensor | None = None,
            init: torch.Tensor | None = None, generate: torch.Tensor | None = None,
            class_weights: torch.Tensor | None = None, each: bool = False) -> Request:
    """A drawing of n images (n of each class asked, for each init given), checked once for this model, in order:
    init by init, class by class. The classes are settings.classes by name, or `labels` (each image's index) as
    given. Guidance applies where classes are asked; a conditional model asked for none draws each image's class
    from `class_weights` (random_classes), unguided, or for an edit, "no class". init: uint8 (count, C, H, W);
    generate: bool (count, 1, H, W), where to inpaint. each=True: labels, init and generate are image i's at row
    i (n rows each), and a conditional model given no labels draws its classes at random, edits too."""
    settings = for_student(config, settings.check(config.diffusion.timesteps, n))
    if init is None and settings.strength != 1:
        raise UsageError("{strength} applies to an edit: give the image to start from with {init}", "strength", "init")
    if generate is None and settings.resample_jumps is not None:
        raise UsageError("{resample_jumps} applies to inpainting: give the mask with {mask}", "resample_jumps", "mask")
    asked = labels if labels is not None or each else class_labels(config, settings.classes, n)
    if asked is not None and not config.model.class_names:
        raise UsageError("this model was trained without classes; sample it without {classes}", "classes")
    if init is not None and not each:
        per_init, count = n if asked is None else len(asked), len(init)
        asked = None if asked is None else asked.repeat(count)
        init = init.repeat_interleave(per_init, 0)
        generate = None if generate is None else generate.repeat_interleave(per_init, 0)
    total = n if each else len(asked) if asked is not None else len(init) if init is not None else n
    names, guidance = config.model.class_names, guidance_for(asked, settings.guidance)
    if asked is None and names:
        asked = (torch.full((total,), len(names)) if init is not None and not each
                 else random_classes(settings.seed, total, len(names), class_weights))
    return Request(replace(settings, guidance=guidance), total, asked, init, generate)


def for_student(config: Config, settings: SampleConfig) -> SampleConfig:
    """A distilled model's settings (training/distill.py): the steps it was distilled for, by DDIM on the grid it
    learnt (its sampler, unset, is that; another is refused), its guidance in its weights (one network call a step:
    the request's guidance is 1; another weight is refused). A model not distilled: the settings as they are."""
    d = config.distill
    if d is None:
        return settings
    how = settings.sampler
    if replace(how, precision=SamplerChoice.precision, threshold=SamplerChoice.threshold) == SamplerChoice():
        how = replace(how, name="ddim", steps=d.steps, spacing="trailing")  # left unset: the student's own
    elif (how.name, how.steps, how.spacing or "trailing", how.eta or 0.0) != ("ddim", d.steps, "trailing", 0.0):
        raise UsageError(f"this model is distilled to sample in {d.steps} ddim steps; sample it without {{sampler}} "
                         f"and {{steps}}, or with ddim and {d.steps} (not {how.name}, {how.steps})", "sampler", "steps")
    if settings.guidance not in (SampleConfig.guidance, d.guidance):
        raise UsageError(f"this model has guidance {d.guidance:g} distilled into it; sample it without {{guidance}}",
                         "guidance")
    return replace(settings, sampler=how, guidance=1.0)


def guidance_for(labels: torch.Tensor | int | None, guidance: float) -> float:
    """The guidance a walk takes: guidance pushes towards a class asked, so without one it is 1 (none)."""
    return guidance if labels is not None else 1.0


class Denoiser:
    """A trained network as the samplers' ε-model: in its precision and memory layout, replayed as a CUDA graph
    on CUDA (unless cuda_graph=False, or its capture fails: `log` says so), its objective adapted, and for a
    conditional model, guided towards the classes asked."""

    def __init__(self, model: torch.nn.Module, config: Config, precision: Precision = "fp32",
                 hooks: SampleHooks = SampleHooks()):
        self.config, self.device, self.hooks = config, next(model.parameters()).device, hooks
        self.calls = CallCounter(None, hooks.progress)
        precision = resolve_precision(precision, self.device)  # 'auto' as training picks it; fp16 only on GPUs
        layout = layout_of(model)  # training chose it (device.memory_format); inputs follow the weights
        self.schedule = NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)

        on_cpu = self.device.type == "cpu"

        def network(x: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
            if on_cpu:
                threads.tick()  # the CPU thread count follows the machine (threads.py; not in its workers)
            with autocast(precision, self.device):
                return model(x.contiguous(memory_format=layout), t, *y)
        fallback = lambda why: hooks.log(f"CUDA graph capture failed ({why}); sampling on without it")  # noqa: E731
        self.net = graphed_forward(network, fallback) if hooks.cuda_graph and self.device.type == "cuda" else network

    def eps_model(self, count: int, labels: torch.Tensor | None = None, guidance: float = 1.0, clip_x0: bool = True,
                  threshold: Threshold = "clip") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The ε-model for a batch of `count` images of classes `labels` (None: no class asked)."""
        classes, net = self.config.model.class_names, self.net
        clip_x0 = clip_x0 and self.config.distill is None  # a student's x̂_0 is the identity's, not an image's
        if classes:
            y = torch.full((count,), len(classes)) if labels is None else labels.long()
            net = guided(net, to_device(y, self.device), len(classes), guidance)
        return as_eps_model(net, self.schedule, self.config.diffusion.objective, clip_x0, dynamic=threshold == "dynamic")


    def count(self, total: int | None) -> None:
        """Count the network calls afresh, towards `total`, for hooks.progress."""
        self.calls = CallCounter(total, self.hooks.progress)

    @torch.no_grad()
    def walk(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None,
             guidance: float = 1.0, sampler: SamplerName = "ddim", callback: Callback | None = None) -> torch.Tensor:
        """The named sampler from x (at timesteps[0]) down over `timesteps`, each call counted; `callback` (else the
        hooks') hears of each step. Interpolation and the time slider walk from points they choose."""
        eps_model = self.calls.wrap(self.eps_model(len(x), labels, guidance))
        return SAMPLERS[sampler].fn(eps_model, x, self.schedule, timesteps, callback=callback or self.hooks.callback)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion of x0 up to timesteps[0] (editing.ddim_invert), each call counted."""
        return ddim_invert(self.calls.wrap(self.eps_model(len(x0), labels)), x0, self.schedule, timesteps)

    @torch.no_grad()
    def draw(self, request: Request) -> Generator[torch.Tensor, None, int]:
        """The request's images as uint8 (count, C, H, W) batches of its batch size, in order, each as soon as it is
        drawn (and at the end, as the generator's value, the network calls a batch took): image i from its own
        seed (seed + i), of class request.labels[i], editing request.init[i] where given (SDEdit at the strength,
        RePaint's jumps where request.generate says), guided with the settings' guidance."""
        s = request.settings
        how, seed, batch_size, guidance = s.sampler, s.seed, s.batch_size, s.guidance
        labels, init, generate, n = request.labels, request.init, request.generate, request.total
        plan = request.plan(self.schedule)
        per_batch = request.nfe(self.schedule)
        self.count(per_batch * -(-n // batch_size))
        c, size = self.config.model.channels, self.config.model.image_size
        callback = self.hooks.callback

        def part(start: int, count: int, share: float = 1.0) -> torch.Tensor:
            """Images start .. start + count of the request, in the model's range."""
            eps_model = self.calls.wrap(self.eps_model(count, None if labels is None else labels[start:start + count],
                                                       guidance, threshold=how.threshold), share)
            generators = image_generators(seed, start, count)
            if plan is None:
                return sample(eps_model, (count, c, size, size), self.schedule, how.name, how.steps, generators,
                              spacing=how.spacing, device=self.device, callback=callback, **how.options())
            rows = slice(start, start + count)
            mask = None if generate is None else to_device(generate[rows], self.device)
            return edit(how.name, eps_model, to_device(to_model(init[rows]), self.device), self.schedule, plan,
                        mask, generators, callback, **how.options())

        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            parts = threads.worker_parts(count) if self.device.type == "cpu" and callback is None else 1
            if parts == 1:
                x = part(start, count)
            else:  # each image from its own seed: the same images, to rounding, whoever draws them
                x = threads.in_workers(part, [(start + lo, hi - lo, 1 / parts) for lo, hi in threads.split(count, parts)])
            yield to_uint8(x).cpu()
        return per_batch


def draw(model: torch.nn.Module, config: Config, request: Request, hooks: SampleHooks = SampleHooks()
         ) -> Generator[torch.Tensor, None, int]:
    """The request's images, batch by batch (Denoiser.draw), from a network in its settings' precision."""
    return Denoiser(model, config, request.settings.sampler.precision, hooks).draw(request)


def generate(model: torch.nn.Module, config: Config, n: int, labels: torch.Tensor | None = None,
             init: torch.Tensor | None = None, generate: torch.Tensor | None = None,
             hooks: SampleHooks = SampleHooks(), **settings) -> tuple[torch.Tensor, int]:
    """n images as uint8 (n, C, H, W) and the network calls (NFE) per batch, at once: draw() of request(), the
    settings by name (SampleConfig.of), each image's class, init and mask given as tensors."""
    batches = draw(model, config, request(config, n, SampleConfig.of(**settings), labels, init, generate, each=True),
                   hooks)
    images = []
    while True:
        try:
            images.append(next(batches))
        except StopIteration as finished:  # its value: the calls a batch took, an edit's path included
            return torch.cat(images), finished.value
