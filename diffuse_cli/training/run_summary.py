"""The text a training run starts with: what runs where, the network's shape, and every choice made for the user
with the option that sets it."""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import Note
from ..images.data import ImageData
from ..network.device import precision_reason
from .distributed import World
from .mirror import MirrorVerdict
from .sizing import Sizing
from ..network.threads import ThreadShare
from ..network.unet import count_parameters

# The settings the start summary names, each as its caller knows it (errors.Note).
SUMMARY_SETTINGS = ("threads", "classes='off'", "hflip", "preset", "image_size", "channels", "precision", "steps")

def start_line(config: Config, data: ImageData, device: torch.device, precision: str, model: torch.nn.Module,
               uses_graph: bool, world: World, cpu: ThreadShare | None = None) -> str:
    """What runs where: the line a run starts with."""
    tc, m = config.train, config.model
    return (f"device {device}, precision {precision}, preset {config.preset}, "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {len(data)} image{'s' * (len(data) != 1)} "
            f"at {m.image_size}x{m.image_size}{' grayscale' * (m.channels == 1)}, "
            f"effective batch {tc.batch_size * tc.grad_accum}"
            + (f" over {world.size} processes" if world.size > 1 else "") + (", CUDA graph" if uses_graph else "")
            + (f", {cpu.threads} CPU thread{'s' * (cpu.threads != 1)}" if cpu is not None else ""))


def network_line(config: Config) -> str:
    """The network's shape: its levels, their channels and where it attends (config.network_shape)."""
    m = config.model
    sides = [m.image_size >> level for level in range(len(m.channel_mult))]
    attends = [f"{s}x{s}" for s in sides if s in m.attention_resolutions] + [f"the middle ({sides[-1]}x{sides[-1]})"]
    return (f"network: {len(sides)} level{'s' * (len(sides) != 1)} "
            f"{' -> '.join(f'{s}x{s}' for s in sides)} of {', '.join(str(m.base_channels * k) for k in m.channel_mult)} "
            f"channels, {m.num_res_blocks} residual block{'s' * (m.num_res_blocks != 1)} each, attention at "
            f"{', '.join(attends[:-1]) + ' and ' if len(attends) > 1 else ''}{attends[-1]}")


def choices_made(config: Config, data: ImageData, chosen: frozenset[str], resume: bool, precision: str,
                 device: torch.device, fitting: bool, verdict: MirrorVerdict | None,
                 cpu: ThreadShare | None = None, sizing: Sizing | None = None) -> str | None:
    """The start-of-run summary: every choice made for the user (all but the settings `chosen`), each with the
    option that sets it; `fitting`: the steps are fitted to a time budget."""
    m = config.model
    rows = []
    if cpu is not None and cpu.fixed is None:
        rows.append(("threads", cpu.reason(), "{threads}"))
    if m.class_names:
        counts = data.class_counts()
        rows.append(("classes", f"{len(counts)}: " + ", ".join(f"{k} ({v:,})" for k, v in counts.items()),
                     "{classes='off'}"))
    if verdict is not None:
        rows.append(("mirroring", f"{'on' if verdict.mirror else 'off'}: {verdict.reason()}",
                     f"{{hflip}} {'off' if verdict.mirror else 'on'}"))
    if sizing is not None:
        rows.append(("model", f"{sizing.preset}: {sizing.reason}", "{preset}"))
    if not resume:
        if "image_size" not in chosen:
            rows.append(("image size", f"{m.image_size}x{m.image_size}", "{image_size}"))
        if "channels" not in chosen:
            rows.append(("channels", "1: every image is grayscale" if m.channels == 1 else "3 (RGB)",
                         "{channels} 3" if m.channels == 1 else "{channels}"))
        if "precision" not in chosen:
            rows.append(("precision", f"{precision}: {precision_reason(precision, device)}", "{precision}"))
    if fitting:
        rows.append(("steps", "fitted to the time budget once the speed is known", "{steps}"))
    if not rows:
        return None
    width = max(len(value) for _, value, _ in rows)
    return Note("\n".join(["choices made for this run (the option on the right sets each):"]
                          + [f"  {name:<11}{value:<{width}}  {option}" for name, value, option in rows]),
                *SUMMARY_SETTINGS)
