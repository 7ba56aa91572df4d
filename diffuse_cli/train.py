"""The training loop: one function, read top to bottom.

Every random draw of step k (data order, t, ε, flips, dropout) comes from generators seeded by
(seed, k), so a resumed run continues exactly as an unbroken one, and the data a global batch
holds does not depend on how many processes share it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import load_training_state, save_model, save_training_state
from .config import UNFITTED_STEPS, Config, TrainConfig
from .data import ImageData, ReadAhead, grid_upscale, make_grid, save_png, to_model
from .device import autocast, memory_available, memory_format, resolve_precision, to_device
from .files import MODEL_FILE, STATE_FILE, atomic_write_bytes
from .generate import generate
from .graphs import graphed_step
from .objectives import diffusion_loss
from .samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from .schedule import NoiseSchedule
from .unet import UNet, count_parameters, layer_outputs

GRID_IMAGES = 16
LOG_EVERY = 10
# --max-time without --steps: the speed is read from step FIT_FROM (past start-up) until the LR warm-up
# is over, FIT_AT steps are done and FIT_SHARE of the budget is spent; then --steps is set to what the
# budget holds (fitted_steps). Until then the run has no step limit (config.UNFITTED_STEPS).
FIT_FROM, FIT_AT, FIT_SHARE = 10, 50, 0.05
# Without --save-every / --sample-every: every DEFAULT_EVERY steps, but at most once every MIN_INTERVAL_S seconds.
# A fast GPU trains 500 steps of `small` in seconds, and each save writes ~40 MB and each grid samples 16 images.
DEFAULT_EVERY, MIN_INTERVAL_S = 500, 60.0
# A CPU training step holds about this many bytes per element of its layers' outputs (unet.layer_outputs):
# 3.7-7.7 measured, bf16 and fp32, `small` at 32x32 to 128x128, `base` and `ddpm-cifar10`.
STEP_BYTES_PER_OUTPUT = 6


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf several steps in a row; the last good checkpoint is kept."""


@dataclass
class Options:
    """How this invocation runs; none of it changes what the model learns."""

    device: torch.device = torch.device("cpu")
    save_every: int | None = None  # None: every DEFAULT_EVERY steps, at most once every MIN_INTERVAL_S (due)
    sample_every: int | None = None
    max_time: float | None = None  # seconds
    fit_steps: bool = False  # with max_time, set config.train.steps to what the budget holds (fitted_steps)
    resume: bool = False
    compile: bool = False
    cuda_graph: bool = True  # replay each step as one CUDA graph where it can (CUDA, one process, bf16/fp32)
    grid_sampler: str = DEFAULT_SAMPLER
    grid_steps: int = DEFAULT_STEPS


@dataclass
class Hooks:
    """How the loop talks to its caller; the engine itself never prints."""

    progress: Callable[[dict[str, Any]], None] = lambda record: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[int], bool] = lambda step: False  # asked before each step


@dataclass
class Result:
    step: int
    stopped_by: str  # "steps", "time" or "signal"
    run_dir: Path
    model: torch.nn.Module  # the online weights
    ema: torch.nn.Module    # the weights to sample with
    records: list[dict[str, Any]] = field(default_factory=list)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then constant or cosine decay to 10% over `steps`."""
    tc = cfg.train
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def due(step: int, every: int | None, since: float) -> bool:
    """Whether to save (or write a grid) after this step: every `every` steps, or by default every
    DEFAULT_EVERY steps at most once every MIN_INTERVAL_S seconds (`since`: the last time, monotonic)."""
    if every is not None:
        return step % every == 0
    return step % DEFAULT_EVERY == 0 and time.monotonic() - since >= MIN_INTERVAL_S


def fitted_steps(step: int, elapsed: float, since: tuple[int, float], budget: float) -> int:
    """The steps a time budget holds at the speed measured since (step, elapsed seconds) earlier:
    `--max-time` without `--steps` trains that many, so that the learning rate's decay ends with the
    budget. The budget stops the run whichever way the estimate errs."""
    per_step = (elapsed - since[1]) / max(1, step - since[0])
    return step + max(1, int((budget - elapsed) / max(per_step, 1e-9)))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has one (CUDA, CPU): 4-5x faster than the
    per-tensor loop that is the CPU default, ~5% of a `ddpm-cifar10` step on the CPU.
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


def ema_decay(step: int, cfg: Config) -> float:
    """EMA warm-up of Karras et al.: 1 - (1 + step)^-power, capped; early steps follow the weights closely."""
    return min(cfg.train.ema_max_decay, 1 - (1 + step) ** -cfg.train.ema_power)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, weight: torch.Tensor) -> None:
    """ema += weight · (model - ema), weight = 1 - decay (0 for a skipped step).

    On a GPU the weight stays a tensor, so that the host never waits and a CUDA graph can
    change it between replays; torch's foreach lerp takes no tensor weight, hence three passes.
    On the CPU reading it costs nothing, and one lerp pass is 6x faster (9 ms for `ddpm-cifar10`)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if weight.device.type == "cpu":
        torch._foreach_lerp_(ema_params, params, weight.item())
        return
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_params, delta)


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

    @classmethod
    def allocate(cls, config: Config, batch: int, device: torch.device, layout: torch.memory_format) -> "StepTensors":
        m = config.model
        image = lambda: torch.zeros(batch, m.channels, m.image_size, m.image_size,  # noqa: E731
                                    device=device).contiguous(memory_format=layout)
        k = config.train.grad_accum
        return cls([image() for _ in range(k)], [torch.zeros(batch, dtype=torch.long, device=device) for _ in range(k)],
                   [image() for _ in range(k)], torch.zeros((), device=device), torch.zeros((), device=device),
                   torch.zeros(3, device=device))


def optimizer_step(net: torch.nn.Module, model: torch.nn.Module, ema: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: Config,
                   schedule: NoiseSchedule, precision: str, io: StepTensors) -> None:
    """One step on the micro-batches in io: forward, backward, clip, AdamW, EMA, all on the device.

    With a fused optimizer nothing waits for the device, so a GPU's queue never drains and a
    CUDA graph can capture the whole step. A step whose loss or gradient is not finite changes
    no weight and no optimizer moment, only the counters in io.bad."""
    tc = config.train
    loss_step = torch.zeros((), device=io.ema_weight.device)
    for micro in range(tc.grad_accum):
        defer_sync = micro < tc.grad_accum - 1 and hasattr(net, "no_sync")  # DDP: all-reduce once, at the end
        with (net.no_sync() if defer_sync else contextlib.nullcontext()), autocast(precision, io.x0[micro].device):
            loss = diffusion_loss(net, config.diffusion.objective, schedule, io.x0[micro], io.t[micro],
                                  io.eps[micro], tc.min_snr_gamma)
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
    io.loss_sum.add_(torch.where(finite, loss_step, 0.0))
    count_bad(io.bad, ~finite)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a bool tensor) is set. Fused AdamW reads the flag on the
    device (the found_inf protocol of torch's GradScaler); other kernels need it on the host."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()


def count_bad(bad: torch.Tensor, is_bad: torch.Tensor) -> None:
    """Update (current run, longest run, total) of non-finite steps in place."""
    run = (bad[0] + 1) * is_bad
    bad.copy_(torch.stack([run, torch.maximum(bad[1], run), bad[2] + is_bad]))


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


def train(config: Config, data: ImageData, run_dir: str | Path, options: Options, hooks: Hooks = Hooks()) -> Result:
    """Train a U-Net on `data`, writing checkpoints, grids and metrics into run_dir."""
    world = distributed.init(options.device)
    device = distributed.device_for(options.device, world)
    tc, run_dir = config.train, Path(run_dir)
    if tc.batch_size % world.size:
        raise ValueError(f"batch size {tc.batch_size} does not split across {world.size} processes")
    local_batch = tc.batch_size // world.size
    if world.is_main:
        check_writable(run_dir)  # fail now, not after hours of training
    precision = resolve_precision(tc.precision, device)
    schedule = NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    layout = memory_format(device, precision)
    model = UNet(config.model).to(device, memory_format=layout)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    use_graph = (options.cuda_graph and device.type == "cuda" and world.size == 1 and not options.compile
                 and precision != "fp16")  # fp16's GradScaler and DDP's hooks do host work each step
    optimizer = make_optimizer(model, tc, capturable=use_graph)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, records, unsaved = 0, [], []  # all log records; those not yet in metrics.jsonl
    if options.resume:
        info = load_training_state(run_dir / STATE_FILE, model, ema, optimizer)
        step = info["step"]
        if scaler.is_enabled() and "grad_scaler" in info:  # else its scale starts over, and overflows cost steps
            scaler.load_state_dict(info["grad_scaler"])
        hooks.log(f"resumed from {run_dir / STATE_FILE} at step {step}")
        if info.get("data_size", len(data)) != len(data):  # the order of the images from here on differs too
            hooks.log(f"note: the data now holds {len(data)} images, {info['data_size']} when the run was saved; "
                      "training goes on with the images as they are now")
    net: torch.nn.Module = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        net = torch.compile(net)
    io = StepTensors.allocate(config, local_batch, device, layout)
    take_step = functools.partial(optimizer_step, net, model, ema, optimizer, scaler, config, schedule, precision, io)
    if use_graph:
        take_step = graphed_step(take_step, on_fallback=lambda why: hooks.log(
            f"CUDA graph capture failed ({why}); training on without it (--no-cuda-graph skips the attempt)"))

    on_gpu = (data.images is not None and device.type == "cuda"
              and data.images.numel() < torch.cuda.mem_get_info(device)[0] // 4)
    images = data.images.to(device) if on_gpu else data.images  # uint8 on the GPU: no host copies
    read_ahead = ReadAhead(data) if images is None else None
    hooks.log(f"device {device}, precision {precision}, preset {config.preset}, "
              f"{count_parameters(model) / 1e6:.2f}M parameters, {len(data)} image{'s' * (len(data) != 1)} "
              f"at {config.model.image_size}x{config.model.image_size}{' grayscale' * (config.model.channels == 1)}, "
              f"effective batch {tc.batch_size * tc.grad_accum}"
              + (f" over {world.size} processes" if world.size > 1 else "")
              + (", CUDA graph" if use_graph else ""))
    if device.type == "cpu":  # where memory runs out, the system kills the process without a word
        need = world.local_size * STEP_BYTES_PER_OUTPUT * layer_outputs(model, local_batch)
        if need > (have := memory_available()):
            hooks.log(f"warning: training steps of batch {tc.batch_size} at {config.model.image_size}x"
                      f"{config.model.image_size} need about {need / 2**30:.1f} GB of memory, and {have / 2**30:.1f} GB "
                      "is available: if the system stops the run, use a smaller --batch-size (with --grad-accum to "
                      "keep the effective batch) or --image-size")

    def facts(now_step: int) -> dict[str, Any]:
        return {"step": now_step, "image_size": config.model.image_size, "channels": config.model.channels,
                "data": data.source, "data_size": len(data), "parameters": count_parameters(model),
                "images_seen": now_step * tc.batch_size * tc.grad_accum, "weights": "ema",
                "world_size": world.size}

    def save(now_step: int) -> None:
        check_bad_steps(now_step, report=False)  # never save over a good checkpoint from a run gone bad
        if not world.is_main:
            return
        info = facts(now_step)
        # The training state keeps the data folder's absolute path (for --resume) and fp16's loss scale.
        resume_info = {**info, "grad_scaler": scaler.state_dict()} if scaler.is_enabled() else info
        save_training_state(run_dir / STATE_FILE, model, ema, optimizer, config, resume_info)
        save_model(run_dir / MODEL_FILE, ema, config, {**info, "data": Path(data.source).name or data.source})
        write_metrics(run_dir / "metrics.jsonl", unsaved, now_step)
        unsaved.clear()

    def sample_grid(now_step: int) -> None:
        if not world.is_main:
            return
        grid, _ = generate(ema, config, GRID_IMAGES, sampler=options.grid_sampler, steps=options.grid_steps,
                           seed=tc.seed, precision=precision, log=hooks.log)
        save_png(make_grid(grid), run_dir / "samples" / f"step_{now_step:06d}.png", grid_upscale(config.model.image_size))

    def check_bad_steps(now_step: int, report: bool = True) -> int:
        """Read the non-finite step counters (a host sync) and stop a run gone bad. With `report`,
        log the skipped steps and start counting afresh; returns how many were skipped."""
        run, longest, total = (int(v) for v in io.bad.tolist())
        if longest >= tc.max_bad_steps:
            raise NonFiniteLoss(f"{longest} non-finite steps in a row by step {now_step}; the last good checkpoint "
                                f"in {run_dir} is kept. Try a lower --lr or --precision fp32")
        if report:
            if total:
                hooks.log(f"step {now_step}: {total} step(s) with a non-finite loss or gradient skipped")
            io.bad.copy_(torch.tensor([run, run, 0]))
        return total

    def fill_inputs(now_step: int) -> None:
        """This step's images, noise and steps into io: every draw seeded by (seed, step, micro-batch)."""
        mine = slice(world.rank * local_batch, (world.rank + 1) * local_batch)
        for micro in range(tc.grad_accum):
            g = torch.Generator(device).manual_seed(mix_seed(tc.seed, 2, now_step, micro))
            t = torch.randint(0, schedule.timesteps, (tc.batch_size,), generator=g, device=device)
            eps = torch.randn((tc.batch_size, config.model.channels, config.model.image_size,
                               config.model.image_size), generator=g, device=device)
            flip = torch.rand(tc.batch_size, generator=g, device=device) < (0.5 if tc.hflip else 0.0)
            idx = batch_indices(now_step, micro, config, len(data), perms)[mine]
            if read_ahead is None:
                pixels = images[to_device(idx, images.device)]
            else:
                pixels = read_ahead.get((now_step, micro), idx)
            x0 = to_model(to_device(pixels, device))  # uint8 over the bus, a quarter of the bytes
            io.x0[micro].copy_(torch.where(flip[mine, None, None, None], x0.flip(-1), x0))
            io.t[micro].copy_(t[mine])
            io.eps[micro].copy_(eps[mine])
        torch.manual_seed(mix_seed(tc.seed, 3, now_step, world.rank))  # dropout; a CUDA graph reads the seed at replay
        if read_ahead is not None and now_step + 1 < tc.steps:  # decode the next step's images during this one
            for micro in range(tc.grad_accum):
                read_ahead.fetch((now_step + 1, micro), batch_indices(now_step + 1, micro, config, len(data), perms)[mine])

    perms: dict[int, torch.Tensor] = {}
    start_time, start_step, stopped_by = time.monotonic(), step, "steps"
    fit_from = None  # (step, seconds) where the speed for fitted_steps is first read
    fitting = (options.fit_steps and options.max_time is not None
               and (not options.resume or tc.steps == UNFITTED_STEPS))
    if fitting:
        config = replace(config, train=replace(tc, steps=UNFITTED_STEPS))
        tc = config.train
    elif tc.steps == UNFITTED_STEPS:
        raise ValueError(f"{run_dir} was stopped before its steps were fitted to its --max-time; "
                         "resume it with --max-time or --steps")
    last_log = (time.monotonic(), step)
    last_written = {"save": start_time, "grid": start_time}  # for the default intervals (due)
    model.train()
    if step >= tc.steps:
        hooks.log(f"the run is already at step {step} of {tc.steps}; pass a larger --steps to train it further")
    while step < tc.steps:
        over_time = options.max_time is not None and time.monotonic() - start_time >= options.max_time
        stop = distributed.any_rank(hooks.should_stop(step) or over_time, world)
        if stop:
            stopped_by = "time" if over_time else "signal"
            break
        lr = lr_at(step, config)
        set_lr(optimizer, lr)
        io.ema_weight.fill_(1 - ema_decay(step, config))
        fill_inputs(step)
        take_step()
        step += 1

        if step % LOG_EVERY == 0 or step == tc.steps:
            now = time.monotonic()
            n_steps = step - last_log[1]
            skipped = check_bad_steps(step)
            finite_steps = n_steps - skipped  # NaN loss for a stretch of skipped steps, not a made-up 0
            if fitting:
                elapsed = time.monotonic() - start_time  # read after check_bad_steps' host sync
                if fit_from is None and step >= FIT_FROM:
                    fit_from = (step, elapsed)
                elif (fit_from is not None and step >= max(tc.warmup, FIT_AT)
                      and elapsed >= FIT_SHARE * options.max_time):
                    steps = distributed.smallest(fitted_steps(step, elapsed, fit_from, options.max_time), world)
                    config = replace(config, train=replace(tc, steps=steps))
                    tc, fitting = config.train, False
                    hooks.log(f"{steps:,} steps fit in the time budget at this speed; the learning rate decays "
                              "over them (--steps sets them instead)")
            record = {"step": step, "loss": io.loss_sum.item() / finite_steps if finite_steps else math.nan, "lr": lr,
                      "images_per_s": n_steps * tc.batch_size * tc.grad_accum / max(now - last_log[0], 1e-9),
                      "time": round(now - start_time, 3), "steps": None if fitting else tc.steps}
            records.append(record)
            unsaved.append(record)
            hooks.progress(record)
            io.loss_sum.zero_()
            last_log = (now, step)
        if step < tc.steps and due(step, options.save_every, last_written["save"]):
            save(step)
            last_written["save"] = time.monotonic()
        if step < tc.steps and due(step, options.sample_every, last_written["grid"]):
            sample_grid(step)
            last_written["grid"] = time.monotonic()

    if step > start_step or not (run_dir / MODEL_FILE).exists():
        save(step)
        if stopped_by != "signal":
            sample_grid(step)
    distributed.barrier(world)
    return Result(step, stopped_by, run_dir, model, ema, records)


def check_writable(folder: Path) -> None:
    """Create the folder and prove that a file can be written and renamed in it."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / ".write-test", b"ok")
    (folder / ".write-test").unlink()


def write_metrics(path: Path, new: list[dict[str, Any]], step: int) -> None:
    """Rewrite metrics.jsonl atomically: the earlier lines, then the new ones (up to `step`)."""
    first_new = new[0]["step"] if new else step + 1
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < first_new:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line is dropped, not fatal
    lines = kept + [json.dumps(r) for r in new]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode() if lines else b"")
