"""The terminal: progress bars with rate and ETA, plain status lines for log files, and Ctrl-C.

Only the CLI imports this module; the engine reports progress through callbacks.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from ..errors import worded
from .options import flag

# Without a terminal (a batch job's log file) lines are not wrapped at 80 columns. No markup: what is printed
# holds the user's paths, and rich would read a folder named "run[v2]" as a style tag and drop it (or stop at a
# "[/...]" it cannot close); styles are given as Text.
out = Console(soft_wrap=not (sys.stdout and sys.stdout.isatty()), markup=False)
err = Console(stderr=True, soft_wrap=not (sys.stderr and sys.stderr.isatty()), markup=False)


class Interrupted(Exception):
    """Ctrl-C, with what was kept: printed as one line, exit code 130."""


STARTED_ENV = "DIFFUSE_STARTED"  # the launching command's start, for the processes torchrun starts (launch.py)


def process_started() -> float:
    """When this command started, on time.monotonic()'s clock (Linux: from /proc; elsewhere: now), so that a time
    budget covers Python's start-up and the imports too; under --devices, the launching command's start."""
    now = time.monotonic()
    if os.environ.get(STARTED_ENV):
        try:
            return min(now, float(os.environ[STARTED_ENV]))
        except ValueError:
            pass
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now


class TimeLeftColumn(TimeRemainingColumn):
    """Rich's time remaining, capped by the task's `deadline` field (time.monotonic()), if any:
    under --max-time the run ends at the deadline, however many steps are left."""

    def render(self, task: Task) -> Text:
        deadline = task.fields.get("deadline")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if left is None or task.finished or (task.time_remaining is not None and task.time_remaining <= left):
            return super().render(task)
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


def shows_progress_bar() -> bool:
    return err.is_terminal or os.environ.get("DIFFUSE_PROGRESS") == "1"


def progress_bar(*extra: str, enabled: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *[TextColumn(f"{{task.fields[{name}]}}") for name in extra],
                    TimeElapsedColumn(), TextColumn("eta"), TimeLeftColumn(), console=err,
                    transient=False, disable=not enabled or not shows_progress_bar())


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


def status_line(step: int, steps: int | None, loss: float, images_per_s: float, elapsed: float, left: float) -> str:
    """The progress bar's facts as one plain line, for a log file (steps None: not yet known)."""
    return (f"step {step}/{'?' if steps is None else steps}  loss {loss:.4f}  {images_per_s:.1f} img/s  "
            f"elapsed {clock(elapsed)}  eta {clock(left) if math.isfinite(left) else '?'}")


class TrainDisplay:
    """`diffuse train` on the terminal: a bar while the images decode, then the training bar (smoothed
    loss, images/s, ETA within --max-time), plain status lines every STATUS_EVERY_S seconds without a
    terminal (a batch job's log file), and from the first step on, Ctrl-C, SIGTERM or SIGUSR1 asking
    the loop to save and stop. `hooks()` is what the engine reports to; off the main DDP process it shows nothing."""

    STATUS_EVERY_S = 60.0

    def __init__(self, budget: float | None, enabled: bool = True, started: float | None = None):
        self.bar = progress_bar("loss", "rate", enabled=enabled)
        self.enabled, self.budget, self.first_step = enabled, budget, 0
        self.decoding_task = self.task = self.stop = self.stage_task = None
        self.began = time.monotonic() if started is None else started  # the time budget's start
        self.started, self.last_status, self.loss = time.monotonic(), -math.inf, math.nan

    def __enter__(self) -> "TrainDisplay":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
        if self.stop is not None:  # training is over: Ctrl-C and SIGTERM mean what they meant before it
            restore_handlers(self.stop)

    @property
    def training(self) -> bool:
        return self.stop is not None

    def hooks(self):
        from ..api import Hooks

        return Hooks(progress=self.progress, log=self.log, should_stop=self.should_stop, decoding=self.decoding,
                     stage=self.stage)

    def stage(self, doing: str) -> None:
        """What the run is doing before its first step and after its last: a line that says so, with its time."""
        if not self.enabled:
            return
        doing = worded(doing, flag)
        if not shows_progress_bar():  # a log file: one line a stage
            self.bar.console.print(f"{'finishing' if self.training else 'starting'}: {doing}", highlight=False)
            return
        if self.stage_task is None:
            self.stage_task = self.bar.add_task(doing, total=None, loss="", rate="",
                                                deadline=self.began + self.budget if self.budget else None)
        self.bar.update(self.stage_task, description=doing)

    def decoding(self, done: int, total: int) -> None:
        if self.decoding_task is None:
            self.decoding_task = self.bar.add_task("decoding images", total=None)
        self.bar.update(self.decoding_task, completed=done, total=total)

    def log(self, message: str) -> None:
        if self.enabled:
            self.bar.console.print(styled(message), highlight=False, soft_wrap=True)

    def should_stop(self, step: int) -> bool:
        if self.stop is None:  # the first step: training has begun, and a stop from now on saves
            self.stop = install_stop_handler(announce=self.enabled)
            for task in (self.decoding_task, self.stage_task):
                if task is not None:
                    self.bar.remove_task(task)
            self.stage_task = None
            self.started, self.first_step = time.monotonic(), step
            self.task = self.bar.add_task("training", total=None, loss="loss  -", rate="",
                                          deadline=self.began + self.budget if self.budget else None)
        return self.stop["requested"]

    def progress(self, record: dict) -> None:
        if math.isfinite(record["loss"]):  # a stretch of skipped steps logs NaN: keep the last smoothed loss
            self.loss = record["loss"] if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * record["loss"]
        self.bar.update(self.task, completed=record["step"], total=record["steps"], loss=f"loss {self.loss:.4f}",
                        rate=f"{record['images_per_s']:.1f} img/s")
        now, step, steps = time.monotonic(), record["step"], record["steps"]
        if not self.enabled or shows_progress_bar() or (now - self.last_status < self.STATUS_EVERY_S and step != steps):
            return
        per_step = (now - self.started) / max(1, step - self.first_step)
        left = math.inf if steps is None else (steps - step) * per_step
        if self.budget:
            left = min(left, max(0.0, self.began + self.budget - now))
        self.bar.console.print(status_line(step, steps, self.loss, record["images_per_s"], now - self.started, left),
                               highlight=False, markup=False)
        self.last_status = now


def styled(message: str) -> Text:
    """A message as plain text, the settings it names as their flags (errors.Note), its leading 'warning:' or
    'note:' in yellow."""
    message = worded(message, flag)
    head, sep, rest = message.partition(":")
    if sep and head in ("warning", "note"):
        return Text.assemble((head + sep, "yellow"), rest)
    return Text(message)


@contextlib.contextmanager
def interrupted_says(message: Callable[[], str]):
    """Turn Ctrl-C inside the block into Interrupted(message())."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message()) from None


def install_stop_handler(announce: bool = True) -> dict:
    """Ctrl-C, SIGTERM or SIGUSR1 ask the loop to save and stop; a second Ctrl-C exits at once."""
    state = {"requested": False}

    def handler(signum, frame):
        if state["requested"]:
            os._exit(130)
        state["requested"] = True
        if announce:
            err.print(Text("\nstopping: saving a checkpoint (Ctrl-C again to quit at once)", style="yellow"))

    # SIGUSR1: what Slurm's --signal sends ahead of a job's time limit
    signums = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    state["previous"] = {signum: signal.signal(signum, handler) for signum in signums}
    return state


def restore_handlers(state: dict) -> None:
    """Put back the handlers install_stop_handler replaced."""
    for signum, previous in state["previous"].items():
        signal.signal(signum, previous)


def checkpoint_table(facts: dict, config) -> Table:
    """`inspect`'s table: what a checkpoint holds, from its header (checkpoint.describe)."""
    from dataclasses import asdict

    table = Table(title=facts["file"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    m, d, step = config.model, config.diffusion, facts.get("step")
    ema = f"post-hoc EMA, length {facts['ema_length']:g}" if "ema_length" in facts else "EMA"
    rows = [("kind", f"weights to sample with ({ema})" if facts["format"] == "diffuse/model"
             else f"resume state ({Path(facts['file']).name})"),
            ("preset", config.preset), ("parameters", f"{facts.get('parameters', 0):,}"),
            ("steps trained", f"{step:,}" if isinstance(step, int) else "?"),
            ("images seen", f"{facts.get('images_seen', 0):,}"),
            ("image size", f"{m.image_size}x{m.image_size}, {m.channels} channel(s)"),
            ("schedule", f"{d.schedule}, T = {d.timesteps}"), ("objective", d.objective),
            ("data", f"{facts.get('data', '?')} ({facts.get('data_size', '?')} images)"),
            ("file size", f"{facts['file_size_bytes'] / 1e6:.1f} MB, {facts['tensors']} tensors")]
    rows += [("loss plot", facts["loss_plot"])] if "loss_plot" in facts else []
    if "imported_from" in facts:
        rows.insert(1, ("imported from", f"{facts['imported_from']} ({facts.get('imported_format', '?')})"))
    if m.class_names:
        counts = facts.get("class_counts", {})
        rows.insert(4, ("classes", ", ".join(f"{c} ({counts[c]:,} images)" if c in counts else c for c in m.class_names)))
    if (d := config.distill) is not None:
        rows.insert(1, ("distilled", f"samples in {d.steps} ddim steps what {d.teacher} draws in {d.teacher_steps}"
                                     + (f", guidance {d.guidance:g} in its weights" if m.class_names else "")))
    rows += [(f"model.{k}", str(v)) for k, v in asdict(m).items()]
    rows += [(f"train.{k}", "not yet fitted to --max-time" if k == "steps" and not config.train.fitted else str(v))
             for k, v in asdict(config.train).items()]
    for key, value in rows:
        table.add_row(key, value)
    return table
