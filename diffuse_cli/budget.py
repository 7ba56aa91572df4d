"""How long a run trains: a number of steps, a wall-clock time, or both.

A Budget owns how many steps the run takes in all. With a time and no step count (`--max-time`
alone) that number is not known at the start: the run times its first steps, once start-up and
the learning-rate warm-up are behind it, and fits the count to the time left, so that the
learning rate's decay ends with the budget. The time stops the run whichever way the estimate errs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .config import TrainConfig
from .errors import RunError

# A saved TrainConfig.steps that means "not yet fitted to --max-time": a run stopped before its fit
# records this (checkpoint format 1), and resuming it fits the steps again.
UNFITTED = 2**62
# The speed is read from step FIT_FROM (past start-up) until the warm-up is over, FIT_AT steps are
# done and FIT_SHARE of the time is spent.
FIT_FROM, FIT_AT, FIT_SHARE = 10, 50, 0.05


@dataclass
class Budget:
    """The steps a run takes (None while they are being fitted to `seconds`) and its wall-clock time."""

    steps: int | None
    seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    _fit_from: tuple[int, float] | None = None  # (step, elapsed) where the speed is first read

    @classmethod
    def for_run(cls, train: TrainConfig, max_time: float | None, fit_steps: bool, resuming: bool,
                run_name: object = "the run") -> "Budget":
        """The budget of a run: `train.steps`, or with fit_steps and max_time, steps fitted to the time
        (also on resuming a run stopped before its fit)."""
        if fit_steps and max_time is not None and (not resuming or train.steps == UNFITTED):
            return cls(None, max_time)
        if train.steps == UNFITTED:
            raise RunError(f"{run_name} was stopped before its steps were fitted to its --max-time; "
                           "resume it with --max-time or --steps")
        return cls(train.steps, max_time)

    @property
    def fitting(self) -> bool:
        return self.steps is None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def done(self, step: int) -> bool:
        """Whether `step` steps complete the run."""
        return self.steps is not None and step >= self.steps

    def recorded_steps(self) -> int:
        """TrainConfig.steps as a checkpoint records it (UNFITTED until fitted)."""
        return UNFITTED if self.steps is None else self.steps

    def observe(self, step: int, warmup: int, agree: Callable[[int], int] = lambda n: n) -> int | None:
        """At a log point (after a host sync): while fitting, read the speed; returns the fitted step
        count the one time it is set. `agree` makes every process of a run take the same count."""
        if not self.fitting or self.seconds is None:
            return None
        elapsed = self.elapsed()
        if self._fit_from is None:
            if step >= FIT_FROM:
                self._fit_from = (step, elapsed)
            return None
        if step < max(warmup, FIT_AT) or elapsed < FIT_SHARE * self.seconds:
            return None
        self.steps = agree(fitted_steps(step, elapsed, self._fit_from, self.seconds))
        return self.steps


def is_fitted(train: TrainConfig) -> bool:
    """Whether a saved run knows its steps (False: stopped before they were fitted to its --max-time)."""
    return train.steps != UNFITTED


def fitted_steps(step: int, elapsed: float, since: tuple[int, float], seconds: float) -> int:
    """The steps a time budget holds at the speed measured since (step, elapsed seconds) earlier."""
    per_step = (elapsed - since[1]) / max(1, step - since[0])
    return step + max(1, int((seconds - elapsed) / max(per_step, 1e-9)))
