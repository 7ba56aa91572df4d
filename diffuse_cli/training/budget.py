"""How long a run trains: a number of steps, a wall-clock time, or both.

A Budget owns how many steps the run takes in all. With a time and no step count (`--max-time`
alone) that number is not known at the start: the run times its first steps, once start-up and
the learning-rate warm-up are behind it, and fits the count to the time left, so that the
learning rate's decay ends with the budget. The time stops the run whichever way the estimate errs.

The time is the caller's whole task: it runs from `started` (the command's own start, for the CLI), so setting
up counts, and the steps stop `reserve` seconds before it ends, the time the last checkpoint and the last grid
are expected to take (the loop measures them), so that the whole task ends with the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import UNFITTED, TrainConfig
from ..errors import RunError

# The first fit reads the speed from step FIT_FROM (past start-up) until the warm-up is over, FIT_AT steps
# are done and FIT_SHARE of the time is spent; every later one, over the last FIT_SHARE of the time, so
# that a machine that gets busier or freer mid-run moves the estimate within seconds.
FIT_FROM, FIT_AT, FIT_SHARE = 10, 50, 0.05


@dataclass
class Budget:
    """The steps a run takes and its wall-clock time.

    The learning rate decays as `progress` goes from 0 (the end of the warm-up) to 1. With a step count
    that is the share of the steps done. With `fitting` (a time and no step count) it is the share of
    the time spent since the warm-up, so that the decay ends as the time runs out however the machine's
    speed changes on the way; only the time stops the run, and `steps` is an estimate for the progress
    bar and the checkpoint (None until the first): the steps done plus the time left over the recent
    time per step, made again at every log point."""

    steps: int | None
    seconds: float | None = None
    fitting: bool = False
    started: float = field(default_factory=time.monotonic)
    reserve: float = 0.0  # seconds kept for what follows the last step
    _seen: list[tuple[int, float]] = field(default_factory=list)  # (step, elapsed) at recent log points
    _warm_at: float | None = None  # elapsed seconds when the warm-up ended (fitting)

    @classmethod
    def for_run(cls, train: TrainConfig, max_time: float | None, fit_steps: bool, resuming: bool,
                run_name: object = "the run", started: float | None = None) -> "Budget":
        """The budget of a run: `train.steps`, or with fit_steps and max_time, steps fitted to the time
        (also on resuming a run stopped before its first fit; a fitted run resumes towards its steps); its time
        counted from `started` (time.monotonic(); None: now)."""
        clock = {} if started is None else {"started": started}
        if fit_steps and max_time is not None and (not resuming or train.steps == UNFITTED):
            return cls(None, max_time, fitting=True, **clock)
        if train.steps == UNFITTED:
            raise RunError(f"{run_name} was stopped before its steps were fitted to its {{max_time}}; "
                           "resume it with {max_time} or {steps}", "max_time", "steps")
        return cls(train.steps, max_time, **clock)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def for_steps(self) -> float | None:
        """The seconds of the budget the steps may take: all of it less the reserve."""
        return None if self.seconds is None else max(0.0, self.seconds - self.reserve)

    def per_step(self) -> float:
        """Seconds a step has taken lately (0 before two log points)."""
        if len(self._seen) < 2:
            return 0.0
        (first, since), (last, now) = self._seen[0], self._seen[-1]
        return (now - since) / max(1, last - first)

    def out_of_time(self) -> bool:
        """Whether the next step would end past the time for steps (more likely than not: half a step to go)."""
        return self.seconds is not None and self.elapsed() + self.per_step() / 2 >= self.for_steps()

    def done(self, step: int) -> bool:
        """Whether `step` steps complete the run (never while fitting: then the time decides)."""
        return not self.fitting and self.steps is not None and step >= self.steps

    def progress(self, step: int, warmup: int, elapsed: float) -> float | None:
        """How far the learning rate's decay has gone at `step` (past the warm-up), `elapsed` seconds into
        the budget: in [0, 1], or None while fitting before the warm-up has ended."""
        if not self.fitting:
            return None if self.steps is None else min(1.0, (step - warmup) / max(1, self.steps - warmup))
        if step < warmup:
            return None
        if self._warm_at is None:
            self._warm_at = elapsed
        return min(1.0, max(0.0, (elapsed - self._warm_at) / max(self.for_steps() - self._warm_at, 1e-9)))

    def recorded_steps(self) -> int:
        """TrainConfig.steps as a checkpoint records it (UNFITTED until fitted)."""
        return UNFITTED if self.steps is None else self.steps

    def observe(self, step: int, warmup: int, agree: Callable[[int], int] = lambda n: n) -> bool:
        """At a log point (after a host sync): while fitting, estimate the steps again. True the first time
        there is an estimate. `agree` makes every process of a run take the same number."""
        if self.seconds is None or step < FIT_FROM:
            return False
        elapsed = self.elapsed()
        self._seen.append((step, elapsed))
        while len(self._seen) > 2 and elapsed - self._seen[1][1] >= FIT_SHARE * self.seconds:
            self._seen.pop(0)  # keep the points of the last FIT_SHARE of the time, and one before them
        first = self.steps is None
        if not self.fitting or first and (step < max(warmup, FIT_AT) or elapsed < FIT_SHARE * self.seconds
                                          or len(self._seen) < 2):
            return False
        self.steps = agree(fitted_steps(step, elapsed, self._seen[0], self.for_steps()))
        return first


def fitted_steps(step: int, elapsed: float, since: tuple[int, float], seconds: float) -> int:
    """The steps a time budget holds at the speed measured since (step, elapsed seconds) earlier."""
    per_step = (elapsed - since[1]) / max(1, step - since[0])
    return step + max(1, int((seconds - elapsed) / max(per_step, 1e-9)))
