"""Editing with a trained model, over the samplers' one contract: SDEdit, inpainting, DDIM inversion.

| here                 | paper                                    | what it is                                        |
|----------------------|------------------------------------------|---------------------------------------------------|
| `strength` s         | t_0 of SDEdit (Meng et al. 2022)         | the init is noised by q(x_k | x_0) to k = round(sT) forward steps (what `diffuse noise --t k` shows), and the sampler's steps below k are run |
| `generate` mask      | 1 - m of RePaint (Lugmayr et al. 2022)   | True where pixels are made, False where the init is kept |
| `keep_known`         | RePaint's x_{t-1}^known                  | ε̂ that makes x̂_0 the init wherever it is kept    |
| `jumps`              | U - 1 (RePaint's resamplings, less one)  | times each stretch is noised back and run again   |
| `stretch`            | j, RePaint's jump length                  | steps a stretch spans                             |
| `ddim_invert`        | DDIM's ODE run upwards (Song et al. 2021, §4.3) | x_0 -> x_T, which DDIM walks back             |

Inpainting keeps the known pixels through the ε-model: where the init is kept, ε̂ is the one whose x̂_0
is the init, so every sampler's x_t there follows q(x_t | x_0) (its posterior chain for DDPM, the
init's own static for DDIM) and its last step lands on the init. The unknown pixels see the kept ones
at every step, as RePaint's re-imposed x^known; its resampling (noise a stretch back up by
q(x_a | x_b), run it again) lets the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .objectives import EpsModel
from .samplers import SAMPLERS, Callback, Generator, randn
from .schedule import NoiseSchedule

# RePaint's jump length j is 10 of its 250 steps: a stretch spans this share of the steps (at least one).
STRETCH_SHARE = 0.04


def start_step(strength: float, timesteps: int) -> int:
    """SDEdit's t_0 as forward steps k = round(s T): 0 leaves the init as it is, T starts from pure noise."""
    return round(strength * timesteps)


def steps_below(timesteps: torch.Tensor, k: int, total: int) -> torch.Tensor:
    """The steps an edit from k forward steps visits: step k - 1 (x_k's index), then the sampler's own steps
    below it, less one that falls within half a step of the start (a step too short to take). k = total:
    the sampler's steps as they are."""
    if k >= total:
        return timesteps
    start = torch.tensor([k - 1], dtype=timesteps.dtype)
    below = timesteps[timesteps < k - 1]
    if len(below) > 1 and k - 1 - below[0] < 0.5 * (below[0] - below[1]):
        below = below[1:]
    return torch.cat([start, below])


def repaint_stretches(n: int, jumps: int, length: int) -> list[tuple[int, int]]:
    """RePaint's path over n steps as stretches (a, b) of positions 0..n (n: the clean image), Lugmayr et al.
    2022, Alg. 1 with its jump schedule: having reached position q = n - p (p = 0, j, 2j, ... < n - j), go back
    up j positions and come down again, `jumps` times; then on."""
    plan, a = [], 0
    for q in sorted(n - p for p in range(0, n - length, length)):
        plan.append((a, q))
        plan += [(q - length, q)] * jumps
        a = q
    return plan + [(a, n)] if a < n else plan


def keep_known(eps_model: EpsModel, schedule: NoiseSchedule, known: torch.Tensor, generate: torch.Tensor) -> EpsModel:
    """The ε-model whose x̂_0 is `known` wherever `generate` is False: ε = (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t)
    there, the network's ε̂ elsewhere."""
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_hat = eps_model(x, t)
        return torch.where(generate, eps_hat, schedule.predict_eps(x, t, known).to(eps_hat.dtype))
    return eps


@dataclass(frozen=True)
class Plan:
    """The path of one edit: `k` forward steps of noise on the init, the steps then visited, and the stretches
    (positions in `timesteps`) they are run in, RePaint's jumps back between them."""

    k: int
    timesteps: torch.Tensor
    stretches: list[tuple[int, int]]

    def nfe(self, sampler: str) -> int:
        """Network calls for the whole path."""
        n, calls = len(self.timesteps), SAMPLERS[sampler].nfe
        return sum(calls(b - a, b == n) for a, b in self.stretches)


def plan_edit(timesteps: torch.Tensor, total: int, strength: float = 1.0, inpaint: bool = False,
              jumps: int = 0) -> Plan:
    """The path of an edit at `strength` over a sampler's `timesteps` (of a `total`-step schedule), with
    RePaint's `jumps` when it inpaints."""
    k = start_step(strength, total)
    ts = steps_below(timesteps, k, total) if k else timesteps[:0]
    n = len(ts)
    stretches = repaint_stretches(n, jumps, max(1, round(STRETCH_SHARE * n))) if inpaint and jumps and n else [(0, n)]
    return Plan(k, ts, stretches if n else [])


def edit(sampler: str, eps_model: EpsModel, init: torch.Tensor, schedule: NoiseSchedule, plan: Plan,
         generate: torch.Tensor | None = None, generator: Generator = None, callback: Callback | None = None,
         **options) -> torch.Tensor:
    """SDEdit from `init` (x_0 in [-1, 1]) along `plan`, and where `generate` is given, RePaint's inpainting:
    the init is kept exactly where `generate` is False. The noise is each image's first draw, as ordinary
    sampling's x_T, so that strength 1 is ordinary sampling."""
    if plan.k == 0:
        return init
    noise = randn(init.shape, generator, init.device)
    fn, ts, T = SAMPLERS[sampler].fn, plan.timesteps, schedule.timesteps
    x = noise if plan.k >= T else schedule.q_sample(init, torch.full((len(init),), plan.k - 1, device=init.device),
                                                      noise)
    if generate is not None:
        eps_model = keep_known(eps_model, schedule, init, generate)
    done, n = 0, len(ts)
    for a, b in plan.stretches:
        if a < done:  # RePaint's jump back: x_a ~ q(x_a | x_b), ᾱ_a / ᾱ_b of the forward process between them
            ab_b = 1.0 if done == n else schedule.alpha_bar_at(ts[done:done + 1]).item()
            ratio = schedule.alpha_bar_at(ts[a:a + 1]).item() / ab_b
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * randn(x.shape, generator, x.device)
        seen = None if callback is None else (lambda i, x_t, x0, at=a: callback(at + i, x_t, x0))
        x = fn(eps_model, x, schedule, ts[a:b], generator=generator, callback=seen, end=ts[b] if b < n else None,
               **options)
        done = b
    return x if generate is None else torch.where(generate, x, init)


@torch.no_grad()
def ddim_invert(eps_model: EpsModel, x0: torch.Tensor, schedule: NoiseSchedule,
                timesteps: torch.Tensor) -> torch.Tensor:
    """DDIM's deterministic step (η = 0) run upwards, x_0 -> x at timesteps[0]: from ᾱ_prev to ᾱ_t with ε̂(x, t)
    taken at the step's start (Song et al. 2021 §4.3, Dhariwal & Nichol 2021 App. F). DDIM on the same
    `timesteps` walks back to x_0, to an error that falls with the steps."""
    ts = timesteps.flip(0)
    abs_ = [1.0] + schedule.alpha_bar_at(ts).tolist()
    x = x0
    for i, t in enumerate(ts):
        eps = eps_model(x, torch.full((len(x),), t.item(), dtype=t.dtype, device=x.device))
        x0_hat = (x - math.sqrt(1 - abs_[i]) * eps) / math.sqrt(abs_[i])
        x = math.sqrt(abs_[i + 1]) * x0_hat + math.sqrt(1 - abs_[i + 1]) * eps
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per image (Shoemake 1985), w = 0: a, w = 1: b. Between two Gaussian noises it
    keeps their norm, where a straight line through the middle shrinks it to 1/sqrt(2) (a blur, for a model)."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = cos.clamp(-1, 1).acos()[:, None]
    small = theta < 1e-4  # (nearly) parallel: the straight line is the arc
    wa = torch.where(small, 1 - w, torch.sin((1 - w) * theta) / torch.sin(theta).clamp(min=1e-12))
    wb = torch.where(small, torch.full_like(theta, w), torch.sin(w * theta) / torch.sin(theta).clamp(min=1e-12))
    return (wa * flat_a + wb * flat_b).view(a.shape).to(a.dtype)
