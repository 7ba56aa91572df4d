"""Which preset a timed run trains when none is named: the widest that gets enough steps in its time.

A wide network learns more per step, a narrow one takes more steps in the same minutes. On a fast machine
`--max-time 10m` gives `small` thousands of steps; on a 2-core CPU without AVX-512 a fifth of them, too few for its
width to pay. Measured on the built-in shapes (`python benchmarks/budget_presets.py`, docs/training.md), each
preset of LADDER is the better choice from ENOUGH_STEPS steps in the budget up; below, the next narrower one is.
The step is timed here, on the run's own network, batch, device and precision, before the first step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..config import Config
from ..presets import model_config
from ..diffusion.objectives import diffusion_loss
from ..diffusion.schedule import NoiseSchedule
from ..network.device import autocast, memory_format
from ..network.unet import UNet

LADDER = ("small", "tiny")  # widest first
# A preset's steps in the budget from which it learns more in that time than the next narrower one. Measured on a
# 2-core AVX2 CPU at 16 px (docs/training.md): in 3 minutes small took 216 steps to tiny's 950 and lost (FID 236
# against 179); in 10 minutes, 912 to 3,341, and won (86 against 97). The crossing is between: taken at the
# geometric mean.
ENOUGH_STEPS = {"small": 450}


@dataclass(frozen=True)
class Sizing:
    """The preset a timed run trains, and why, for the start-of-run summary."""

    preset: str
    steps: int  # the steps it is expected to take in the budget
    reason: str


def step_seconds(config: Config, device: torch.device, precision: str, batch: int) -> float:
    """Seconds of one forward and backward of the network at `batch` (the second of two: the first builds kernels).
    The optimizer's update, a few percent of a step, is left out."""
    layout = memory_format(device, precision)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = UNet(config.model).to(device, memory_format=layout)
        m, schedule = config.model, NoiseSchedule.make(config.diffusion.schedule, config.diffusion.timesteps)
        x0 = torch.zeros(batch, m.channels, m.image_size, m.image_size, device=device).contiguous(memory_format=layout)
        t = torch.randint(0, schedule.timesteps, (batch,), device=device)
        seconds = []
        for _ in range(2):
            began = time.monotonic()
            with autocast(precision, device):
                loss = diffusion_loss(net, config.diffusion.objective, schedule, x0, t, torch.randn_like(x0))
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.monotonic() - began)
    return seconds[-1]


def size_for_budget(config: Config, seconds_left: float, device: torch.device, precision: str,
                    overrides: dict | None = None) -> Sizing:
    """The widest preset of LADDER, from config's down, whose steps in `seconds_left` reach ENOUGH_STEPS (else the
    narrowest); the image size, channels, classes and `overrides` (ModelConfig fields the user set) are kept."""
    batch = config.train.batch_size * config.train.grad_accum
    rungs = LADDER[LADDER.index(config.preset):] if config.preset in LADDER else (config.preset,)
    steps: dict[str, int] = {}
    for preset in rungs:
        seconds = step_seconds(with_preset(config, preset, overrides), device, precision, batch)
        steps[preset] = int(seconds_left / max(seconds, 1e-9))
        if steps[preset] >= ENOUGH_STEPS.get(preset, 0):
            break
    if preset == config.preset:
        return Sizing(preset, steps[preset], f"about {steps[preset]:,} steps fit in the time here")
    return Sizing(preset, steps[preset], f"{config.preset} would take about {steps[config.preset]:,} steps in the time "
                  f"here, fewer than the {ENOUGH_STEPS[config.preset]:,} from which it learns more than {preset} "
                  f"(about {steps[preset]:,})")


def with_preset(config: Config, preset: str, overrides: dict | None = None) -> Config:
    """config with another preset's network at the same image size, channels and classes, and `overrides`."""
    m = config.model
    model = model_config(preset, **{**(overrides or {}), "image_size": m.image_size, "channels": m.channels,
                                    "class_names": m.class_names})
    return replace(config, preset=preset, model=model)
