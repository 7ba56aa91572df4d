"""What a sampling call asks for, as two objects that travel from the CLI and the API down to the loop:
`SamplerChoice`, how the reverse process runs (samplers.py), and `SampleConfig`, what to draw with it.
Each is checked once, here, where its fields are defined; none of it is saved with the weights.

A new sampling option is a field of one of them, its check below, and the code that uses it. (No torch at the
top of this module: the CLI's help reads the defaults from here, and answers at once.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..config import (Precision, SamplerName, Spacing, Threshold, Variance, check_choice, check_guidance, check_seed,
                      check_steps, require_positive)
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

    from .schedule import NoiseSchedule

# RePaint's jumps by measurement (docs/editing.md): the fill agrees with the kept half far more often than with 0 or
# 1, and more jumps gain little for what each costs (about one more sampling).
RESAMPLE_JUMPS = 2
# DDIM steps of `diffuse interpolate`, for the inversion and the way back: by measurement (docs/editing.md),
# where the frames at the ends come back within a few 8-bit levels of the images.
INTERPOLATE_STEPS = 100


@dataclass(frozen=True)
class SamplerChoice:
    """How the reverse process runs: the sampler, its steps and their spacing, its own options, the precision
    of the network calls and how x̂_0 is kept in [-1, 1]."""

    # DDIM at 16 steps by measurement (docs/samplers.md): by FID against the training images it scored level with
    # or better than the earlier default, dpm++3m-sde at 25, on runs of shapes and of photographs 2 to 10 minutes old.
    name: SamplerName = "ddim"
    steps: int = 16
    spacing: Spacing | None = None  # None: the sampler's own (samplers.SAMPLERS)
    eta: float | None = None  # None: the sampler's own (0, or 1 for the -sde solvers)
    variance: Variance | None = None  # ddpm only; None: posterior
    precision: Precision = "fp32"
    threshold: Threshold = "clip"  # clipped, or dynamic thresholding (Saharia et al. 2022)

    def check(self, timesteps: int | None = None) -> SamplerChoice:
        """Refuse settings this sampler cannot run, or cannot run on a model of `timesteps` steps; return self."""
        from .samplers import SAMPLERS, sampler_info

        info = sampler_info(self.name)
        if self.spacing is not None:
            check_choice(self.spacing, Spacing, "spacing")
        check_choice(self.precision, Precision, "precision")
        check_choice(self.threshold, Threshold, "threshold")
        if self.variance is not None:
            check_choice(self.variance, Variance, "variance")
        check_steps(self.steps, timesteps if timesteps is not None else self.steps)
        for name in self.options().keys() - set(info.options):
            takers = [s for s, other in SAMPLERS.items() if name in other.options]
            raise UsageError(f"{{{name}}} does not apply to {self.name}; it applies to {', '.join(takers)}", name)
        if self.eta is not None and not 0 <= self.eta < math.inf:
            raise UsageError(f"{{eta}} must be at least 0, and finite, not {self.eta}", "eta")
        if self.name == "ddim" and self.eta is not None and self.eta > 1:
            raise UsageError(f"{{eta}} {self.eta} is above 1: ddim's step has no room for more noise than DDPM's "
                             "(eta 1)", "eta")
        return self

    def options(self) -> dict[str, Any]:
        """The sampler's own keyword options that are set (eta, variance)."""
        return {name: value for name, value in (("eta", self.eta), ("variance", self.variance)) if value is not None}

    def timesteps(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The descending steps the sampler visits."""
        from .samplers import SAMPLERS, spaced_timesteps

        return spaced_timesteps(schedule, self.steps, self.spacing or SAMPLERS[self.name].spacing)

    def nfe(self) -> int:
        """Network calls a batch takes, from noise to the clean image."""
        from .samplers import SAMPLERS

        return SAMPLERS[self.name].nfe(self.steps)


@dataclass(frozen=True)
class SampleConfig:
    """What to draw, and with which sampler: seeds, classes and guidance, and an edit's settings."""

    sampler: SamplerChoice = field(default_factory=SamplerChoice)
    seed: int = 0  # image i uses seed + i
    batch_size: int = 64
    classes: tuple[str, ...] = ()  # a conditional model's classes to draw, by name or index; ("all",): each
    # Classifier-free guidance weight w: 1 is the plain conditional model, 0 the unconditional one. 1 by
    # measurement (docs/samplers.md): on the built-in shapes it already draws the class asked every time,
    # and every w above it drew worse images.
    guidance: float = 1.0
    # Editing (editing.py). SDEdit's strength: the share of the schedule an init image is noised to; 1 is
    # ordinary sampling.
    strength: float = 1.0
    # RePaint's resampling when inpainting: times each stretch of the path is noised back and run again
    # (None: RESAMPLE_JUMPS; set, it needs a mask to inpaint).
    resample_jumps: int | None = None

    def jumps(self) -> int:
        """RePaint's jumps an inpainting takes."""
        return RESAMPLE_JUMPS if self.resample_jumps is None else self.resample_jumps

    @classmethod
    def of(cls, **settings: Any) -> SampleConfig:
        """From settings by name, as the CLI's options and Model.sample's keywords give them: `sampler` names the
        sampler, and SamplerChoice's other fields (steps, eta, ...) sit beside this class's own."""
        how = {f.name for f in fields(SamplerChoice)} - {"name"}
        choice = SamplerChoice(**{k: settings.pop(k) for k in list(settings) if k in how})
        if isinstance(settings.get("sampler"), str):
            choice = replace(choice, name=settings.pop("sampler"))
        elif isinstance(settings.get("sampler"), SamplerChoice):
            choice = settings.pop("sampler")
        if isinstance(settings.get("classes"), (str, int)):
            settings["classes"] = (settings["classes"],)
        if "classes" in settings:
            settings["classes"] = tuple(map(str, settings["classes"]))
        unknown = settings.keys() - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown sampling setting {sorted(unknown)[0]!r}; the settings are: "
                             f"{', '.join(sorted(how | {'sampler'} | {f.name for f in fields(cls)}))}")
        return cls(choice, **settings)

    def check(self, timesteps: int | None = None, n: int | None = None) -> SampleConfig:
        """Refuse settings that cannot work (for a model of `timesteps` steps, drawing `n` images); return self.
        Without the model, what any model would refuse: the CLI asks before it loads one."""
        if n is not None and n < 1:
            raise UsageError(f"{{n}} must be at least 1, not {n}", "n")
        self.sampler.check(timesteps)
        require_positive(batch_size=self.batch_size)
        if not 0 < self.strength <= 1:
            raise UsageError(f"{{strength}} must be in (0, 1] (1: from pure noise, near 0: the init as it is), not "
                             f"{self.strength}", "strength")
        if self.resample_jumps is not None and self.resample_jumps < 0:
            raise UsageError(f"{{resample_jumps}} must be at least 0, not {self.resample_jumps}", "resample_jumps")
        check_guidance(self.guidance)
        check_seed(self.seed)
        return self
