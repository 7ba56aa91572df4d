"""The time slider's frames: what diffusion does to an image, and what a trained model does back.

At each of `frames` values of k (forward steps: 0 is the image, T pure noise), computed once:

- forward:  x_k from q(x_k | x_0) with one fixed ε, so that moving through k looks continuous;
- walk:     the model's reverse trajectory from that same static at k = T (deterministic DDIM over the
            frames' steps): x_k, and beside it the model's x̂_0 there, what it "believes" is under the noise;
- restored: the image noised to k (the forward frame) and denoised back to k = 0 by the model, with no
            class: at low k the image comes back, at high k the model invents a new one.

A distilled student (config.distill) learnt a few DDIM steps on one grid and nothing between them, so it walks
that grid: its walk stands at each of its steps until it jumps to the next (a frame shows where it stood at or
above the frame's k), and a restoration from k takes one step to the student's next grid point below and its
own steps from there.

slider_page.py turns them into one self-contained HTML page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .pixels import to_model, to_uint8
from .denoiser import Denoiser, SampleHooks, guidance_for
from .samplers import spaced_timesteps

RESTORE_STEPS = 12  # network calls for a restoration from pure noise; fewer from lower k (in proportion)


@dataclass(frozen=True)
class Frames:
    """uint8 (frames, C, H, W) images at the forward steps `ks` (ascending, from 0 to T)."""

    ks: list[int]
    alpha_bar: list[float]  # ᾱ after k steps (1 at k = 0)
    forward: torch.Tensor
    walk: torch.Tensor
    walk_x0: torch.Tensor
    restored: torch.Tensor
    class_name: str | None = None


@torch.no_grad()
def explore_frames(net: torch.nn.Module, config, image: torch.Tensor, frames: int = 60, seed: int = 0,
                   label: int | None = None, guidance: float = 1.0, hooks: SampleHooks = SampleHooks()) -> Frames:
    """The frames of the time slider for a uint8 (C, H, W) image at the model's size; `label`: a conditional
    model's class to walk back into (None: no class, and no guidance)."""
    T = config.diffusion.timesteps
    ks = sorted({round(i * T / (frames - 1)) for i in range(frames)})
    guidance = guidance_for(label, guidance)
    denoiser = Denoiser(net, config, hooks=hooks)
    schedule, device = denoiser.schedule, denoiser.device
    labels = None if label is None else torch.tensor([label])
    x0 = to_model(image)[None].to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    alpha_bar = [1.0] + schedule.alpha_bar[[k - 1 for k in ks[1:]]].tolist()
    forward = [x0] + [schedule.q_sample(x0, torch.tensor([k - 1], device=device), eps) for k in ks[1:]]

    student = None if config.distill is None else spaced_timesteps(schedule, config.distill.steps, "trailing")

    # the walk back: DDIM from the forward's own static at k = T, visiting every frame's step (a student: its own)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    steps = torch.tensor([k - 1 for k in reversed(ks[1:])]) if student is None else student
    final = denoiser.walk(forward[-1], steps, labels, guidance, "ddim",
                          callback=lambda i, x_t, x0_hat: seen.__setitem__(int(steps[i]) + 1, (x_t, x0_hat)))
    stood = [seen[min(v for v in seen if v >= k)] for k in ks[1:]]  # its own step; a student: where it stood
    walk = [final] + [x_t for x_t, _ in stood]
    walk_x0 = [final] + [x0_hat for _, x0_hat in stood]

    # restorations: from each frame's x_k back to the image's step, in proportion fewer calls from lower k;
    # with no class, so that they show what of the image survives, not what a class makes of it
    restored = [x0]
    for k, x_k in zip(ks[1:], forward[1:]):
        if student is None:
            n = max(1, math.ceil(RESTORE_STEPS * k / T))
            ts, sampler = torch.linspace(k - 1, 0, n + 1)[:-1].round().long().unique_consecutive(), "dpm++2m"
        else:
            ts, sampler = torch.cat([torch.tensor([k - 1]), student[student < k - 1]]), "ddim"
        restored.append(denoiser.walk(x_k, ts, sampler=sampler))
    as_uint8 = lambda xs: to_uint8(torch.cat(xs)).cpu()  # noqa: E731
    name = None if label is None else config.model.class_names[label]
    return Frames(ks, alpha_bar, as_uint8(forward), as_uint8(walk), as_uint8(walk_x0), as_uint8(restored), name)
