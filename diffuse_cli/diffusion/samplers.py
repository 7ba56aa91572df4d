"""Samplers: x_T ~ N(0, I) -> x_0, each a small function over one ε-model interface.

An ε-model is any callable `(x_t, t) -> ε̂` with t a (B,) tensor of step indices (integer, or
fractional where a sampler needs times between steps). Every sampler has the signature

    sampler(eps_model, x, schedule, timesteps, generator=None, callback=None, end=None, **options) -> x_0

where `timesteps` is a descending 1-D tensor of the steps to visit (see `spaced_timesteps`);
after the last one the sampler lands on the clean image, or, given `end` (a step below the
last), on x_end: a stretch of a longer path, as RePaint's resampling runs (editing.py).
`callback(i, x_t, x0_hat)` sees every step. `generator` is a torch.Generator, or a list of
them, one per image, so that an image's noise does not depend on what else is in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence, get_args

import torch

from ..config import SamplerName, Spacing, Variance, check_choice, check_steps
from ..errors import UsageError
from ..network.fast_ops import to_device
from .objectives import EpsModel
from .schedule import NoiseSchedule, float_dtype

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise; with a list of generators, row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return to_device(torch.randn(*shape, generator=generator, device="cpu"), device)
    rows = [torch.randn(*shape[1:], generator=g) for g in generator]
    return to_device(torch.stack(rows), device)


def _t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Step t (a host scalar) for each image of the batch, made on x's device (no copy there);
    a fractional one in the widest float it has."""
    dtype = float_dtype(x.device) if t.is_floating_point() else t.dtype
    return torch.full((x.shape[0],), t.item(), dtype=dtype, device=x.device)


def _lam(alpha_bar: float) -> float:
    """λ = log(α/σ) = ½ log(ᾱ / (1 - ᾱ)), the half log-SNR in which DPM-Solver and UniPC step."""
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def _predict(eps_model: EpsModel, x: torch.Tensor, t: torch.Tensor, ab: float, i: int,
             callback: Callback | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ε̂ at (x_t, t) and the x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) it implies; the callback sees step i."""
    eps = eps_model(x, _t(t, x))
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    if callback:
        callback(i, x, x0)
    return eps, x0


def _with_end(schedule: NoiseSchedule, timesteps: torch.Tensor,
              end: torch.Tensor | None) -> tuple[list[float], list[float]]:
    """ᾱ at each visited step, and at the step after it: after the last, ᾱ at `end`, or 1 (the clean image)."""
    ab = schedule.alpha_bar_at(timesteps).tolist()
    return ab, ab[1:] + [1.0 if end is None else schedule.alpha_bar_at(torch.as_tensor(end)).item()]


def ddpm(eps_model: EpsModel, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
         generator: Generator = None, callback: Callback | None = None,
         end: torch.Tensor | None = None, variance: Variance = "posterior") -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on respaced steps (Nichol & Dhariwal 2021, §4).

    variance='posterior' uses σ_t² = β̃_t, variance='beta' uses σ_t² = β_t.
    """
    ab_all, ab_prev_all = _with_end(schedule, timesteps, end)
    for i, t in enumerate(timesteps):
        ab, ab_prev = ab_all[i], ab_prev_all[i]
        beta = 1 - ab / ab_prev
        _, x0 = _predict(eps_model, x, t, ab, i, callback)
        # Posterior mean of q(x_{t-1} | x_t, x_0), eq. 7, with x_0 predicted.
        x = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if ab_prev < 1.0:  # every step but the one to the clean image adds noise
            var = beta * (1 - ab_prev) / (1 - ab) if variance == "posterior" else beta
            x = x + math.sqrt(var) * randn(x.shape, generator, x.device)
    return x


def ddim(eps_model: EpsModel, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
         generator: Generator = None, callback: Callback | None = None, end: torch.Tensor | None = None,
         eta: float = 0.0) -> torch.Tensor:
    """DDIM, eq. 12 of Song et al. 2021; eta=0 is deterministic, eta=1 is DDPM's posterior noise."""
    ab_all, ab_prev_all = _with_end(schedule, timesteps, end)
    for i, t in enumerate(timesteps):
        ab, ab_prev = ab_all[i], ab_prev_all[i]
        eps, x0 = _predict(eps_model, x, t, ab, i, callback)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
    return x


# The weight of DPM-Solver++(3M)'s second difference d2 ≈ h²/2·x̂_0'', as a multiple of the one in Lu et al.'s
# code (and in k-diffusion and diffusers): -φ_3, half of what the Taylor expansion asks (∫ e^-(h-u) u²/2 du =
# -φ_3·h²), which makes 3M second order, not third. The full weight, 2, measures order 4 on a Gaussian, but on
# the mixture it is no better at 10-50 calls, nor on a trained model (benchmarks/samplers.py --d2-weight 2):
# the reference step stays, and our samples stay comparable with those tools'.
D2_WEIGHT = 1.0


def dpmpp(eps_model: EpsModel, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
          generator: Generator = None, callback: Callback | None = None, end: torch.Tensor | None = None,
          order: int = 2, eta: float = 0.0) -> torch.Tensor:
    """DPM-Solver++(2M) and (3M), Lu et al. 2022: multistep, data prediction, in λ = log(α/σ).

    Each step integrates x̂_0(λ) against the exponential weight, with x̂_0 extrapolated from the
    last `order` predictions (order 2: their Algorithm 2, the midpoint rule; order 3: second
    differences, weighted as in their code: see D2_WEIGHT). The first steps use the history there is.
    eta=0 solves the probability-flow ODE. eta>0 solves the SDE instead (their §5,
    SDE-DPM-Solver++): a step integrates over h·(1+eta) and puts back the noise that removes,
    which corrects some of an imperfect model's errors.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, not {order}")
    ab_all, ab_next_all = _with_end(schedule, timesteps, end)
    x0s, hs = [], []  # previous predictions and step sizes, newest last
    for i, t in enumerate(timesteps):
        ab, ab_next = ab_all[i], ab_next_all[i]
        _, x0 = _predict(eps_model, x, t, ab, i, callback)
        if ab_next >= 1.0:  # the last step lands on σ = 0, where the solution is the denoised image
            return x0
        h = _lam(ab_next) - _lam(ab)
        h_eta = (1 + eta) * h
        phi_1 = -math.expm1(-h_eta)  # 1 - e^-h, the weight of x̂_0 in an exponential-integrator step
        phi_2 = 1 - phi_1 / h_eta     # the weight of its first derivative in λ
        phi_3 = phi_2 / h_eta - 0.5   # and of its second
        update, this_order = phi_1 * x0, min(order, len(x0s) + 1)
        if this_order == 2:
            update = update + (0.5 * phi_1 * h / hs[-1]) * (x0 - x0s[-1])
        elif this_order == 3:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (x0 - x0s[-1]) / r0, (x0s[-1] - x0s[-2]) / r1
            d2 = (d1_0 - d1_1) / (r0 + r1)
            update = update + phi_2 * (d1_0 + r0 * d2) - D2_WEIGHT * phi_3 * d2
        x = math.sqrt((1 - ab_next) / (1 - ab)) * math.exp(-eta * h) * x + math.sqrt(ab_next) * update
        if eta > 0:
            x = x + math.sqrt((1 - ab_next) * -math.expm1(-2 * eta * h)) * randn(x.shape, generator, x.device)
        x0s, hs = (x0s + [x0])[-2:], (hs + [h])[-2:]
    return x


def _unipc_rhos(h: float, ratios: list[float], corrector: bool) -> list[float]:
    """UniPC's weights ρ of the divided differences (Zhao et al. 2023, Alg. 2/3, B(h) = e^h - 1).

    `ratios` are r_k = (λ_k - λ_s)/h of the earlier predictions, then 1 (the target). The
    predictor of order p solves the first p-1 of R ρ = b; the corrector solves all of it.
    """
    hh, factorial = -h, 1
    b_h = math.expm1(hh)
    phi = b_h / hh - 1  # φ_k(h) in their recursion: φ_{k+1} = φ_k / hh - 1/(k+1)!
    R, b = [], []
    for k in range(1, len(ratios) + 1):
        R.append([r ** (k - 1) for r in ratios])
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    n = len(ratios) if corrector else len(ratios) - 1
    if n == 0:
        return []
    if n == 1:
        return [0.5]  # the paper fixes ρ = 1/2 for one difference (solving gives 1/2 + O(h))
    R_, b_ = torch.tensor(R, dtype=torch.float64)[:n, :n], torch.tensor(b, dtype=torch.float64)[:n]
    return torch.linalg.solve(R_, b_).tolist()


def _unipc_step(x: torch.Tensor, x0s: list[torch.Tensor], lams: list[float], lam_next: float, ab: float,
                ab_next: float, x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step from λ = lams[-1] to lam_next, or with x0_next (x̂_0 at the step's end) UniC's."""
    m0, h = x0s[-1], lam_next - lams[-1]
    ratios = [(lam - lams[-1]) / h for lam in reversed(lams[:-1])] + [1.0]
    diffs = [(m - m0) / r for m, r in zip(reversed(x0s[:-1]), ratios)]
    if x0_next is not None:
        diffs.append(x0_next - m0)
    rhos = _unipc_rhos(h, ratios, corrector=x0_next is not None)
    x0_hat = m0 + sum(rho * d for rho, d in zip(rhos, diffs))  # x̂_0 extrapolated over the step
    return math.sqrt((1 - ab_next) / (1 - ab)) * x - math.sqrt(ab_next) * math.expm1(-h) * x0_hat


def unipc(eps_model: EpsModel, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
          generator: Generator = None, callback: Callback | None = None, end: torch.Tensor | None = None,
          order: int = 3) -> torch.Tensor:
    """UniPC, Zhao et al. 2023: a multistep predictor (UniP-p, data prediction) and a corrector
    (UniC) that re-uses the network call at the new point, raising the order by one for free.
    Orders are lowered on the first steps (no history yet) and on the last ones."""
    ab_all, ab_next_all = _with_end(schedule, timesteps, end)
    lams = [_lam(ab) for ab in ab_all + ab_next_all[-1:] if ab < 1.0]  # and at `end`, if given
    x0s: list[torch.Tensor] = []
    last = None  # the arguments of the last predictor step, for its correction
    for i, t in enumerate(timesteps):
        _, x0 = _predict(eps_model, x, t, ab_all[i], i, callback)
        if ab_next_all[i] >= 1.0:
            return x0
        if last is not None:
            x = _unipc_step(*last, x0_next=x0)
        x0s = (x0s + [x0])[-order:]
        p = min(order, len(x0s), len(timesteps) - i)
        last = (x, x0s[-p:], lams[i + 1 - p:i + 1], lams[i + 1], ab_all[i], ab_next_all[i])
        x = _unipc_step(*last)
    return x


def heun(eps_model: EpsModel, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
         generator: Generator = None, callback: Callback | None = None,
         end: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic Heun, Algorithm 1 of Karras et al. 2022, in x̃ = x_t / sqrt(ᾱ_t) where dx̃/dσ = ε."""
    ts = list(timesteps) + [None if end is None else torch.as_tensor(end)]
    sigmas = schedule.sigma_at(timesteps).tolist() + [0.0 if end is None else schedule.sigma_at(ts[-1]).item()]
    x = x * math.sqrt(1 + sigmas[0] ** 2)
    eps_at = lambda x_tilde, i: eps_model(x_tilde / math.sqrt(1 + sigmas[i] ** 2), _t(ts[i], x_tilde))  # noqa: E731
    for i in range(len(timesteps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = eps_at(x, i)
        if callback:
            callback(i, x / math.sqrt(1 + s**2), x - s * d)
        x_next = x + (s_next - s) * d
        if s_next > 0:  # second-order correction, except on the last step to σ = 0
            x_next = x + (s_next - s) * 0.5 * (d + eps_at(x_next, i + 1))
        x = x_next
    return x / math.sqrt(1 + sigmas[-1] ** 2)  # back from x̃ to x_end (a no-op at σ = 0)


# -- which steps to visit ------------------------------------------------------------------
SIGMA_MAX = 80.0  # EDM's σ_max
# Below σ = 0.01, noise is about one 8-bit level of an image in [-1, 1] (2/255 = 0.008), and
# steps spent there change nothing a PNG can show. The cosine schedule's σ(0) is below it, and on
# that schedule the floor also lowers the mixture benchmark's error (docs/samplers.md).
SIGMA_MIN = 0.01


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, eq. 5 of Karras et al. 2022."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """`steps` descending step indices, from the noisiest step T-1 down.

    trailing: evenly spaced ending at T-1 (Lin et al. 2024); at steps = T it is every step.
    quadratic: denser near the clean end (Song et al. 2021, CIFAR-10). karras: ρ = 7 σ spacing
    (Karras et al. 2022); logsnr: uniform in log σ, i.e. in λ = -log σ (Lu et al. 2022). Both are
    fractional steps from σ_max = min(σ(T-1), 80) (above 80, x_t is noise) down to
    σ_min = max(σ(0), 0.01) (below 0.01, less than an 8-bit level is left to remove).
    """
    T = check_steps(steps, schedule.timesteps) and schedule.timesteps
    check_choice(spacing, Spacing, "spacing")
    if spacing == "trailing":
        return (torch.linspace(T, 0, steps + 1, dtype=torch.float64)[:-1].round().long() - 1)
    if spacing == "quadratic":
        t = (torch.linspace(0, math.sqrt(T - 1), steps, dtype=torch.float64) ** 2).round().long()
        for i in range(1, steps):  # keep them distinct where the parabola is flat
            t[i] = max(t[i], t[i - 1] + 1)
        return t.flip(0)
    sigma_min, sigma_max = max(schedule.sigmas[0].item(), SIGMA_MIN), min(schedule.sigmas[-1].item(), SIGMA_MAX)
    if spacing == "karras":
        sigmas = karras_sigmas(steps, sigma_min, sigma_max)
    else:  # logsnr
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return schedule.sigma_to_t(sigmas).clamp(0, T - 1)


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., torch.Tensor]
    spacing: Spacing  # its default: the paper's, or for the SDE solvers what measured best on a trained model
    nfe: Callable[..., int]  # network calls for a number of steps (clean=False: ending at a noisy step)
    description: str
    options: tuple[str, ...] = ()  # the keyword options its function takes, e.g. ("eta",)


def _one_a_step(steps: int, clean: bool = True) -> int:
    return steps


def _heun_calls(steps: int, clean: bool = True) -> int:
    """Two calls a step, less the corrector of a last step that lands on the clean image."""
    return max(1, 2 * steps - clean)


# Each sampler's entry, in the order config.SamplerName names them (which the CLI's help reads without torch).
SAMPLERS: dict[str, SamplerInfo] = dict(zip(get_args(SamplerName), (
    SamplerInfo(ddpm, "trailing", _one_a_step, "ancestral, Ho et al. 2020", ("variance",)),
    SamplerInfo(ddim, "trailing", _one_a_step, "Song et al. 2021; --eta 0 is deterministic", ("eta",)),
    SamplerInfo(partial(dpmpp, order=2), "logsnr", _one_a_step, "DPM-Solver++(2M), Lu et al. 2022", ("eta",)),
    SamplerInfo(partial(dpmpp, order=3), "logsnr", _one_a_step, "DPM-Solver++(3M), Lu et al. 2022", ("eta",)),
    SamplerInfo(partial(dpmpp, order=2, eta=1.0), "trailing", _one_a_step,
                "SDE-DPM-Solver++(2M), Lu et al. 2022 (dpm++2m with --eta 1)", ("eta",)),
    SamplerInfo(partial(dpmpp, order=3, eta=1.0), "trailing", _one_a_step, "SDE-DPM-Solver++(3M) (dpm++3m with --eta 1)",
                ("eta",)),
    SamplerInfo(unipc, "logsnr", _one_a_step, "UniPC-bh2, Zhao et al. 2023, order 3"),
    SamplerInfo(heun, "karras", _heun_calls, "Karras et al. 2022 (EDM), rho=7"),
), strict=True))


def sampler_info(name: str) -> SamplerInfo:
    """The named sampler's entry in SAMPLERS; an unknown name is refused here, the one place that checks it."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps whose network calls fit in `nfe`."""
    return max(k for k in range(1, nfe + 1) if SAMPLERS[sampler].nfe(k) <= nfe)


class CallCounter:
    """Counts the network calls (NFE) of the ε-models it wraps, over a whole request (every batch of it), and
    reports (done, total) to `progress`."""

    def __init__(self, total: int | None = None, progress: Callable[[float, int | None], None] | None = None):
        self.total, self.progress, self.done = total, progress, 0

    def wrap(self, eps_model: EpsModel, share: float = 1) -> EpsModel:
        """eps_model, each call counted as `share` of one (a part of a batch drawn in a worker: threads.py)."""
        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.done += share
            if self.progress:
                self.progress(self.done, self.total)
            return eps_model(x, t)
        return counted


def sample(eps_model: EpsModel, shape: Sequence[int], schedule: NoiseSchedule, sampler: str, steps: int,
           generator: Generator = None, spacing: Spacing | None = None, device: torch.device | str = "cpu",
           callback: Callback | None = None, **options) -> torch.Tensor:
    """Draw x_T ~ N(0, I) of this shape and run the named sampler on `steps` steps."""
    info = sampler_info(sampler)
    timesteps = spaced_timesteps(schedule, steps, spacing or info.spacing)
    x = randn(shape, generator, device)
    return info.fn(eps_model, x, schedule, timesteps, generator=generator, callback=callback, **options)
