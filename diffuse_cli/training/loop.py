"""The training loop, as named steps: data (each step's inputs: batches.py), model, optimisation, the time budget,
checkpointing (the run folder's files: run_folder.py), reporting.

Every random draw of step k (data order, t, ε, flips, dropout) comes from generators seeded by
(seed, k), so a resumed run continues exactly as an unbroken one, and the data a global batch
holds does not depend on how many processes share it.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed

from ..network import threads
from .budget import Budget
from ..formats.checkpoint import load_training_state
from ..config import Config
from ..images.data import ImageData
from .batches import Batches
from ..network.device import device_memory_available, memory_format, resolve_precision
from ..errors import Note, TrainingFailed, UsageError
from ..formats.files import MODEL_FILE, STATE_FILE
from ..diffusion.sampling import SamplerChoice
from ..network.graphs import graphed_step
from .mirror import MirrorVerdict, known_verdict, probe_data
from .run_folder import RunFolder, check_writable
from .fid_watch import FidWatch
from ..diffusion.schedule import NoiseSchedule
from . import posthoc_ema
from .step import StepTensors, ema_decay, lr_at, make_optimizer, optimizer_step, set_lr
from .memory import fit_batch
from .distill import load_teacher, teacher_loss
from .run_summary import choices_made, network_line, start_line
from .sizing import Sizing
from ..network.unet import UNet

LOG_EVERY = 10
# Without --save-every / --sample-every: every DEFAULT_EVERY steps, but at most once every MIN_INTERVAL_S seconds.
# A fast GPU trains 500 steps of `small` in seconds, and each save writes ~40 MB and each grid samples 16 images.
DEFAULT_EVERY, MIN_INTERVAL_S = 500, 60.0


class NonFiniteLoss(TrainingFailed):
    """Training produced NaN/inf several steps in a row; the last good checkpoint is kept."""


@dataclass
class Options:
    """How this invocation runs; none of it changes what the model learns."""

    device: torch.device = torch.device("cpu")
    save_every: int | None = None  # None: every DEFAULT_EVERY steps, at most once every MIN_INTERVAL_S (due)
    sample_every: int | None = None
    max_time: float | None = None  # seconds, from `started`: setting up, the steps, the last checkpoint and grid
    started: float | None = None  # time.monotonic() when the time budget began (None: when train() is called)
    fit_steps: bool = False  # with max_time, fit the number of steps to it (budget.Budget)
    resume: bool = False
    compile: bool = False
    cuda_graph: bool = True  # replay each step as one CUDA graph where it can (CUDA, one process, bf16/fp32)
    checkpointing: bool = False  # recompute each residual block's activations in the backward (memory.py)
    eval_every: int | None = None  # FID every this many steps (fid_watch.py); None: never
    eval_n: int = 1000  # samples (and training images) each FID is of
    eval_ema: tuple[float, ...] = ()  # post-hoc EMA lengths each FID scores instead of the EMA (the best kept)
    grid_sampler: str = SamplerChoice.name
    grid_steps: int = SamplerChoice.steps
    chosen: frozenset[str] = frozenset()  # the settings the user gave: the start-of-run summary names the others
    sizing: Sizing | None = None  # the preset chosen for the time budget, and why (sizing.py), where it was
    initial_weights: dict[str, torch.Tensor] | None = None  # train --from: the weights a new run starts from


@dataclass
class Hooks:
    """How the loop talks to its caller; the engine itself never prints."""

    progress: Callable[[dict[str, Any]], None] = lambda record: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[int], bool] = lambda step: False  # asked before each step, and while a grid is drawn
    decoding: Callable[[int, int], None] = lambda done, total: None  # images of a folder decoded so far (api.train)
    stage: Callable[[str], None] = lambda doing: None  # what the run is doing before its first step and after its last


@dataclass
class Result:
    step: int
    stopped_by: str  # "steps", "time" or "signal"
    run_dir: Path | None
    model: torch.nn.Module  # the online weights
    ema: torch.nn.Module    # the weights to sample with
    records: list[dict[str, Any]] = field(default_factory=list)
    config: Config | None = None  # as trained: with the steps fitted to --max-time and hflip decided
    mirror: MirrorVerdict | None = None  # the probe's verdict, where the data decided hflip

    @property
    def fitted(self) -> bool:
        """Whether the run knows its steps (False: stopped before they were fitted to its max_time)."""
        return self.config.train.fitted


def due(step: int, every: int | None, since: float) -> bool:
    """Whether to save (or write a grid) after this step: every `every` steps, or by default every
    DEFAULT_EVERY steps at most once every MIN_INTERVAL_S seconds (`since`: the last time, monotonic)."""
    if every is not None:
        return step % every == 0
    return step % DEFAULT_EVERY == 0 and time.monotonic() - since >= MIN_INTERVAL_S


# -- model and optimisation ------------------------------------------------------------------
@dataclass
class Learner:
    """The network, its EMA, the optimizer and (fp16) the gradient scaler, and the step that updates them."""

    config: Config  # the run's, its batch split into micro-batches where a step would not fit (memory.fit_batch)
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    io: StepTensors
    take_step: Callable[[], None]
    uses_graph: bool
    averages: list[torch.nn.Module] = field(default_factory=list)  # post-hoc EMA's, one a config.train.posthoc_ema
    gammas: list[float] = field(default_factory=list)  # their power functions' exponents

    @classmethod
    def build(cls, config: Config, options: Options, world: distributed.World, device: torch.device,
              precision: str, schedule: NoiseSchedule, log: Callable[[str], None]) -> "Learner":
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        layout = memory_format(device, precision)
        model = UNet(config.model).to(device, memory_format=layout)
        teacher = teacher_config = None
        if config.distill is not None:  # the student starts as its teacher (resuming, as it was saved)
            teacher, teacher_config = load_teacher(config, device)
            teacher = teacher.to(memory_format=layout)
            model.load_state_dict(teacher.state_dict())
        elif options.initial_weights is not None:
            model.load_state_dict(options.initial_weights)
        model.checkpointing = options.checkpointing
        weights = sum(p.numel() * p.element_size() for p in model.parameters())  # already taken from what is free
        config, note = fit_batch(config, model, precision, options.checkpointing, world,
                                 device_memory_available(device) + weights)
        if note:
            log(note)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        averages = [copy.deepcopy(ema) for _ in config.train.posthoc_ema]
        # fp16's GradScaler and DDP's hooks do host work each step; checkpointing's recomputation reads the CUDA
        # generator's state, which a graph capture does not allow
        use_graph = (options.cuda_graph and device.type == "cuda" and world.size == 1 and not options.compile
                     and precision != "fp16" and not options.checkpointing and teacher is None)
        optimizer = make_optimizer(model, config.train, capturable=use_graph)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        net: torch.nn.Module = model
        if world.size > 1:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if options.compile:
            net = torch.compile(net)
        io = StepTensors.allocate(config, config.train.batch_size // world.size, device, layout)
        take_step = functools.partial(optimizer_step, net, model, ema, optimizer, scaler, config, schedule,
                                      precision, io,
                                      None if teacher is None else teacher_loss(config, teacher, teacher_config, schedule,
                                                                                 precision),
                                      averages)
        if use_graph:
            take_step = graphed_step(take_step, on_fallback=lambda why: log(Note(
                f"CUDA graph capture failed ({why}); training on without it ({{cuda_graph=False}} skips the attempt)",
                "cuda_graph=False")))
        return cls(config, model, ema, optimizer, scaler, io, take_step, use_graph, averages,
                   [posthoc_ema.gamma_of(s) for s in config.train.posthoc_ema])

    def resume(self, path: Path) -> dict[str, Any]:
        """Load the weights, EMA, optimizer, post-hoc EMA's averages and loss scale saved at `path`; returns the
        saved facts. A state without the averages (saved before there were any) keeps none from here on."""
        info = load_training_state(path, self.model, self.ema, self.optimizer, self.averages)
        if self.averages and not info["averages"]:
            self.averages.clear()
            self.config = replace(self.config, train=replace(self.config.train, posthoc_ema=()))
        if self.scaler.is_enabled() and "grad_scaler" in info:  # else its scale starts over, and overflows cost steps
            self.scaler.load_state_dict(info["grad_scaler"])
        return info

    def step(self, step: int, config: Config, budget: Budget, elapsed: float) -> float:
        """Set this step's learning rate and EMA weight, and take it; returns the learning rate."""
        lr = lr_at(step, config.train, budget.progress(step, config.train.warmup, elapsed))
        set_lr(self.optimizer, lr)
        self.io.ema_weight.fill_(1 - ema_decay(step, config.train))
        for i, gamma in enumerate(self.gammas[:len(self.averages)]):  # fill_: no host-to-device copy to wait for
            self.io.average_weights[i].fill_(1 - posthoc_ema.beta(step + 1, gamma))
        self.take_step()
        return lr

    def bad_steps(self, step: int, max_bad: int, run_dir: Path | None, report: bool = True,
                  log: Callable[[str], None] = lambda m: None) -> int:
        """Read the non-finite step counters (a host sync) and stop a run gone bad. With `report`, log
        the skipped steps and start counting afresh; returns how many were skipped."""
        run, longest, total = (int(v) for v in self.io.bad.tolist())
        if longest >= max_bad:
            raise NonFiniteLoss(f"{longest} non-finite steps in a row by step {step}; the last good checkpoint "
                                f"in {run_dir} is kept. Try a lower {{lr}} or {{precision}} fp32", "lr", "precision")
        if report:
            if total:
                log(f"step {step}: {total} step(s) with a non-finite loss or gradient skipped")
            self.io.bad.copy_(torch.tensor([run, run, 0]))
        return total


# -- reporting and the loop ------------------------------------------------------------------
@dataclass
class Reporter:
    """Every LOG_EVERY steps and at the end: a record of loss, learning rate and speed, for the caller
    (hooks.progress), metrics.jsonl and loss.png; and the time budget's reading of the speed."""

    hooks: Hooks
    learner: Learner
    folder: RunFolder
    budget: Budget
    world: distributed.World
    last: tuple[float, int]  # (time, step) of the last record
    cpu: threads.ThreadShare | None = None  # on the CPU: its thread count goes in each record
    records: list[dict[str, Any]] = field(default_factory=list)

    def due(self, step: int) -> bool:
        return step % LOG_EVERY == 0 or self.budget.done(step)

    def report(self, step: int, lr: float, config: Config) -> Config:
        """Log the steps since the last record; returns config with the steps the budget now expects."""
        tc, now = config.train, time.monotonic()
        n_steps = step - self.last[1]
        skipped = self.learner.bad_steps(step, tc.max_bad_steps, self.folder.path, log=self.hooks.log)
        finite_steps = n_steps - skipped  # NaN loss for a stretch of skipped steps, not a made-up 0
        if self.budget.observe(step, tc.warmup, agree=lambda n: distributed.smallest(n, self.world)):
            self.hooks.log(Note(f"about {self.budget.steps:,} steps fit in the time budget at this speed; the learning "
                                "rate decays over the time left ({steps} sets a number of steps instead)", "steps"))
        if self.budget.fitting:
            config = replace(config, train=replace(tc, steps=self.budget.recorded_steps()))
        record = {"step": step, "loss": self.learner.io.loss_sum.item() / finite_steps if finite_steps else math.nan,
                  "lr": lr, "images_per_s": n_steps * tc.batch_size * tc.grad_accum / max(now - self.last[0], 1e-9),
                  "time": round(now - self.budget.started, 3), "steps": self.budget.steps,
                  **({"threads": self.cpu.threads} if self.cpu is not None else {})}
        self.records.append(record)
        self.folder.record(record)
        self.hooks.progress(record)
        self.learner.io.loss_sum.zero_()
        self.last = (now, step)
        return config


def train(config: Config, data: ImageData, run_dir: str | Path | None, options: Options,
          hooks: Hooks = Hooks()) -> Result:
    """Train a U-Net on `data`, writing checkpoints, grids and metrics into run_dir (None: nothing written)."""
    started = time.monotonic() if options.started is None else options.started
    world = distributed.init(options.device)
    device = distributed.device_for(options.device, world)
    tc, run_dir = config.train, None if run_dir is None else Path(run_dir)
    if tc.batch_size % world.size:
        raise UsageError(f"batch size {tc.batch_size} does not split across {world.size} processes")
    if options.resume and run_dir is None:
        raise UsageError("resuming needs the run folder to resume from")
    if world.is_main and run_dir is not None:
        check_writable(run_dir)  # fail now, not after hours of training
    precision = resolve_precision(tc.precision, device)
    schedule = NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)
    verdict = None
    if tc.hflip is None:  # decide from the data, and record the decision in the run's config
        if (verdict := known_verdict(data)) is None:
            hooks.stage(Note("probing the images for a handedness ({hflip} decides instead)", "hflip"))
            verdict = probe_data(data, tc.seed)
        verdict = replace(verdict, mirror=bool(distributed.smallest(int(verdict.mirror), world)))
        config = replace(config, train=replace(tc, hflip=verdict.mirror))
        tc = config.train

    hooks.stage("building the network")
    learner = Learner.build(config, options, world, device, precision, schedule, hooks.log)
    config, tc = learner.config, learner.config.train
    step = 0
    if options.resume:
        info = learner.resume(run_dir / STATE_FILE)
        step, config, tc = info["step"], learner.config, learner.config.train
        hooks.log(f"resumed from {run_dir / STATE_FILE} at step {step}")
        if info.get("data_size", len(data)) != len(data):  # the order of the images from here on differs too
            hooks.log(f"note: the data now holds {len(data)} images, {info['data_size']} when the run was saved; "
                      "training goes on with the images as they are now")
    batches = Batches(data, config, schedule, world, device)
    folder = RunFolder(run_dir, data, learner, world,
                       fid=FidWatch(data, options.eval_n, device, options.eval_ema) if options.eval_every else None)
    folder.start(step)
    budget = Budget.for_run(tc, options.max_time, options.fit_steps, options.resume, run_dir, started)
    cpu = threads.share() if device.type == "cpu" else None
    if cpu is not None:
        cpu.settle()  # the first count, before the first step; then tick() follows the machine
    hooks.log(start_line(config, data, device, precision, learner.model, learner.uses_graph, world, cpu))
    hooks.log(network_line(config))
    chosen = options.chosen if not options.resume else frozenset(config.train.__dataclass_fields__)
    if summary := choices_made(config, data, chosen, options.resume, precision, device, budget.fitting, verdict, cpu,
                               options.sizing):
        hooks.log(summary)

    config = replace(config, train=replace(tc, steps=budget.recorded_steps()))  # what a checkpoint records
    first = time.monotonic()
    report = Reporter(hooks, learner, folder, budget, world, last=(first, step), cpu=cpu)
    start_step, stopped_by, lr = step, "steps", tc.lr
    last_written = {"save": first, "grid": first}  # for the default intervals (due)
    stop_asked = lambda: hooks.should_stop(step)  # noqa: E731 (asked while a grid or FID is drawn, too)

    def save(now_step: int) -> None:
        learner.bad_steps(now_step, tc.max_bad_steps, run_dir, report=False)  # never save over a good checkpoint
        folder.save(now_step, config)

    learner.model.train()
    if budget.done(step):
        hooks.log(Note(f"the run is already at step {step} of {budget.steps}; pass a larger {{steps}} to train it "
                       "further", "steps"))
    while not budget.done(step):
        over_time = budget.out_of_time()
        stop, elapsed = distributed.agree(hooks.should_stop(step) or over_time, budget.elapsed(), world)
        if stop:
            stopped_by = "time" if over_time else "signal"
            break
        if cpu is not None:
            cpu.tick()  # metrics.jsonl records the count at each log point
        batches.fill(step, learner.io, last=budget.done(step + 1))
        lr = learner.step(step, config, budget, elapsed)
        step += 1
        if report.due(step):
            config = report.report(step, lr, config)
            if budget.seconds is not None and not budget.reserve and step - start_step >= LOG_EVERY:
                if folder.save_times.expected() is None:  # a first checkpoint, timed: the last one will take as long
                    save(step)
                    last_written["save"] = time.monotonic()
                budget.reserve = folder.closing_seconds(config, options.grid_sampler, options.grid_steps, precision)
        if learner.averages and step % posthoc_ema.snapshot_spacing(step) == 0:
            folder.snapshot(step, config)
            if budget.reserve:  # the last snapshot is part of the closing, too
                budget.reserve = folder.closing_seconds(config, options.grid_sampler, options.grid_steps, precision)
        if not budget.done(step) and due(step, options.save_every, last_written["save"]):
            save(step)
            last_written["save"] = time.monotonic()
        if not budget.done(step) and due(step, options.sample_every, last_written["grid"]):
            folder.grid(step, config, options.grid_sampler, options.grid_steps, precision, hooks.log, stop_asked)
            last_written["grid"] = time.monotonic()
        if options.eval_every and step % options.eval_every == 0:
            folder.evaluate(step, config, precision, hooks.log, stop_asked)

    if step > report.last[1]:  # stopped between log points: the last steps get their record too
        config = report.report(step, lr, config)
    if budget.fitting and stopped_by == "time":  # the run is complete where its time ended, fitted yet or not
        config = replace(config, train=replace(config.train, steps=step))
    if step > start_step or (run_dir is not None and not (run_dir / MODEL_FILE).exists()):
        hooks.stage("saving the checkpoint")
        save(step)
        if learner.averages and step % posthoc_ema.snapshot_spacing(step):
            folder.snapshot(step, config)  # the step a reconstruction is of
        if stopped_by != "signal":
            hooks.stage("drawing the last grid of samples")
            folder.grid(step, config, options.grid_sampler, options.grid_steps, precision, hooks.log, stop_asked)
    distributed.barrier(world)
    return Result(step, stopped_by, run_dir, learner.model, learner.ema, report.records, config, verdict)
