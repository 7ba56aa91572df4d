"""A run folder's files, as training writes them: checkpoints (the training state and the EMA model), metrics.jsonl,
the sample grids and loss.png, and with --eval-every, FID and the best weights. With no folder, nothing is written."""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config
from ..diffusion.denoiser import SampleHooks, generate
from ..diffusion.sampling import SampleConfig, SamplerChoice
from ..formats.checkpoint import save_model, save_training_state
from ..formats.files import BEST_MODEL_FILE, LOSS_PLOT, MODEL_FILE, STATE_FILE, atomic_write_bytes
from ..images.data import ImageData
from ..images.pictures import grid_upscale, make_grid, save_image, save_png
from ..network.unet import count_parameters
from . import distributed
from .fid_watch import FidWatch
from .plots import loss_plot
from .posthoc_ema import Snapshots, kept_snapshots
from ..formats.snapshots import list_snapshots, save_snapshot

GRID_IMAGES = 16


class Cancelled(Exception):
    """A stop was asked for while a grid or an FID was drawn: it is dropped, and the run goes on to save and stop."""


def cancelled_by(stop: Callable[[], bool]) -> Callable[[float, int], None]:
    """A sampling progress callback that ends the drawing (Cancelled) once `stop()` says so: between network calls."""
    def progress(done: float, total: int) -> None:
        if stop():
            raise Cancelled
    return progress


@dataclass
class Durations:
    """How long one kind of closing work takes: the median of its last few timings, so that one stall (a busy disk's
    fsync, a neighbour's burst) does not move a time budget's end by its whole length."""

    seen: deque[float] = field(default_factory=lambda: deque(maxlen=5))

    def add(self, seconds: float) -> None:
        self.seen.append(seconds)

    def expected(self) -> float | None:
        """None before the first timing."""
        return statistics.median(self.seen) if self.seen else None


@dataclass
class RunFolder:
    """Checkpoints, metrics and sample grids in the run folder; with no folder (None), nothing is written."""

    path: Path | None
    data: ImageData
    learner: Any  # loop.Learner: the weights, EMA, optimizer and loss scaler that a checkpoint holds
    world: distributed.World
    unsaved: list[dict[str, Any]] = field(default_factory=list)  # log records not yet in metrics.jsonl
    history: list[dict[str, Any]] = field(default_factory=list)  # every log record of the run, for loss.png
    fid: FidWatch | None = None  # with --eval-every
    # What the closing of a time budget takes (closing_seconds): writing a checkpoint, a post-hoc EMA snapshot, and
    # a grid per network call (timed on its own once, then on every grid drawn)
    save_times: Durations = field(default_factory=Durations)
    snapshot_times: Durations = field(default_factory=Durations)
    call_times: Durations = field(default_factory=Durations)

    def start(self, step: int) -> None:
        """On resume: the records written before `step` (a resumed run keeps its loss curve and its best FID)."""
        if self.path is not None and self.world.is_main:
            self.history = [r for r in read_metrics(self.path / "metrics.jsonl") if r["step"] <= step]
            if self.fid is not None and (fids := [r["fid"] for r in self.history if "fid" in r]):
                self.fid.best = min(fids)

    def evaluate(self, step: int, config: Config, precision: str, log: Callable[[str], None],
                 stop: Callable[[], bool] = lambda: False) -> None:
        """FID now, of the EMA weights or, with the watch's post-hoc EMA lengths, of each length rebuilt at this step:
        a record in metrics.jsonl and loss.png, and model_best.safetensors when one is the best yet; none if `stop()`
        says so while the samples are drawn."""
        if self.fid is None or not self.world.is_main:
            return
        candidates = [(None, self.learner.ema)]
        if self.fid.lengths and self.path is not None:
            if step not in list_snapshots(self.path):
                self.snapshot(step, config)  # the reconstruction is of the newest snapshot's step
            snaps, net = Snapshots(self.path), copy.deepcopy(self.learner.ema)
            candidates = [(length, net) for length in self.fid.lengths]
        fids: dict[float | None, float] = {}
        for length, net in candidates:
            if length is not None:
                net.load_state_dict(snaps.rebuild(length))
            try:
                fids[length], best = self.fid(net, config, precision, log, cancelled_by(stop))
            except Cancelled:
                return
            if best and self.path is not None:
                save_model(self.path / BEST_MODEL_FILE, net, config,
                           {**self.facts(step, config), "data": Path(self.data.source).name or self.data.source,
                            "fid": fids[length], "fid_samples": self.fid.n,
                            **({} if length is None else {"weights": f"post-hoc EMA, σ_rel {length:g}",
                                                          "ema_length": length})})
        chosen = min(fids, key=fids.get)
        by_length = {} if chosen is None else {"ema_length": chosen, "fid_by_length": {f"{k:g}": v for k, v in
                                                                                        fids.items()}}
        self.record({"step": step, "fid": fids[chosen], "fid_samples": self.fid.n, **by_length})
        said = "" if chosen is None else f" at σ_rel {chosen:g} (" + ", ".join(
            f"{k:g}: {v:.2f}" for k, v in fids.items()) + ")"
        log(f"step {step}: FID {fids[chosen]:.2f} of {self.fid.n} samples{said}" + (
            " (the best yet)" if fids[chosen] <= self.fid.best else f" (best {self.fid.best:.2f})"))

    def record(self, record: dict[str, Any]) -> None:
        self.unsaved.append(record)
        self.history.append(record)

    def facts(self, step: int, config: Config) -> dict[str, Any]:
        tc = config.train
        counts = {"class_counts": self.data.class_counts()} if config.model.class_names else {}
        return {"step": step, "image_size": config.model.image_size, "channels": config.model.channels,
                "data": self.data.source, "data_size": len(self.data), **counts,
                "parameters": count_parameters(self.learner.model), "images_seen": step * tc.batch_size * tc.grad_accum,
                "weights": "ema", "world_size": self.world.size}

    def save(self, step: int, config: Config) -> None:
        if self.path is None or not self.world.is_main:
            return
        began, learner, info = time.monotonic(), self.learner, self.facts(step, config)
        # The training state keeps the data folder's absolute path (for --resume) and fp16's loss scale.
        resume_info = {**info, "grad_scaler": learner.scaler.state_dict()} if learner.scaler.is_enabled() else info
        save_training_state(self.path / STATE_FILE, learner.model, learner.ema, learner.optimizer, config, resume_info,
                            learner.averages)
        save_model(self.path / MODEL_FILE, learner.ema, config,
                   {**info, "data": Path(self.data.source).name or self.data.source})
        write_metrics(self.path / "metrics.jsonl", self.unsaved, step)
        self.unsaved.clear()
        self.save_times.add(time.monotonic() - began)

    def snapshot(self, step: int, config: Config) -> None:
        """ema/step_N.safetensors: post-hoc EMA's averages now; then the snapshots the run no longer keeps go."""
        if self.path is None or not self.world.is_main:
            return
        began = time.monotonic()
        save_snapshot(self.path, step, self.learner.averages, config, self.facts(step, config))
        found = list_snapshots(self.path)
        for old in set(found) - set(kept_snapshots(list(found), step)):
            found[old].unlink(missing_ok=True)
        self.snapshot_times.add(time.monotonic() - began)

    def grid(self, step: int, config: Config, sampler: str, steps: int, precision: str,
             log: Callable[[str], None], stop: Callable[[], bool] = lambda: False) -> None:
        """samples/step_N.png and loss.png; no grid if `stop()` says so while it is drawn."""
        if self.path is None or not self.world.is_main:
            return
        began = time.monotonic()
        classes = len(config.model.class_names)  # a conditional model's grid: its classes in turn, row by row
        labels = torch.arange(GRID_IMAGES) * classes // GRID_IMAGES if classes else None
        try:
            grid, _ = generate(self.learner.ema, config, GRID_IMAGES, labels,
                               hooks=SampleHooks(progress=cancelled_by(stop), log=log), sampler=sampler, steps=steps,
                               seed=config.train.seed, precision=precision, guidance=SampleConfig.guidance)
        except Cancelled:
            log(f"step {step}: stopping, so no grid of samples")
            return
        save_png(make_grid(grid), self.path / "samples" / f"step_{step:06d}.png", grid_upscale(config.model.image_size))
        if self.history:
            save_image(loss_plot(self.history), self.path / LOSS_PLOT)
        self.call_times.add((time.monotonic() - began) / SamplerChoice(sampler, steps).nfe())


    def closing_seconds(self, config: Config, sampler: str, steps: int, precision: str) -> float:
        """How long the last checkpoint and grid are expected to take: the grid's network calls at the time each took
        lately (before the first grid, 1 call of the grid's batch, timed), and a checkpoint's and snapshot's writing
        times."""
        if self.path is None or not self.world.is_main:
            return 0.0
        if self.call_times.expected() is None:
            began = time.monotonic()  # one call of the network, whatever it was trained for (a student, too)
            generate(self.learner.ema, replace(config, distill=None), GRID_IMAGES, sampler="ddim", steps=1, seed=0,
                     precision=precision)
            self.call_times.add(time.monotonic() - began)
        return (self.call_times.expected() * SamplerChoice(sampler, steps).nfe() + (self.save_times.expected() or 0.0)
                + (self.snapshot_times.expected() or 0.0))


def check_writable(folder: Path) -> None:
    """Create the folder and prove that a file can be written and renamed in it."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / ".write-test", b"ok")
    (folder / ".write-test").unlink()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn or foreign line is dropped, not fatal."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
            except ValueError:
                continue
    return records


def write_metrics(path: Path, new: list[dict[str, Any]], step: int) -> None:
    """Rewrite metrics.jsonl atomically: the earlier lines, then the new ones (up to `step`)."""
    first_new = new[0]["step"] if new else step + 1
    lines = [json.dumps(r) for r in read_metrics(path) if r["step"] < first_new] + [json.dumps(r) for r in new]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode() if lines else b"")
