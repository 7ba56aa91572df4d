"""The noise schedule and the forward process q(x_t | x_0) of Ho et al. 2020.

Notation (index t = 0..T-1 in code is the paper's step t = 1..T; the clean image is
"before step 0"):

| code                 | paper                               | diffusers / k-diffusion |
|----------------------|-------------------------------------|-------------------------|
| `betas`              | β_t                                 | betas                   |
| `alphas`             | α_t = 1 - β_t                       | alphas                  |
| `alpha_bar`          | ᾱ_t = ∏_{s≤t} α_s                   | alphas_cumprod          |
| `alpha_bar_prev`     | ᾱ_{t-1}, with ᾱ before step 0 = 1   | alphas_cumprod_prev     |
| `posterior_variance` | β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) | posterior_variance      |
| `snr`                | ᾱ_t / (1 - ᾱ_t)                     | (min-SNR papers' SNR)   |
| `sigmas`             | σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)         | sigmas (Karras' σ)      |

x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, equivalently x_t / sqrt(ᾱ_t) = x_0 + σ_t ε.
Everything is computed once in float64; callers cast to their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import Schedule
from ..errors import ConfigError


def linear_betas(timesteps: int) -> torch.Tensor:
    """β linear from 1e-4 to 0.02 (Ho et al. 2020), rescaled so that T≠1000 keeps ᾱ_T."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def betas_from_alpha_bar(alpha_bar: torch.Tensor, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 - ᾱ_t / ᾱ_{t-1}, clipped at max_beta so that the last steps stay finite."""
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return (1 - alpha_bar / prev).clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) / ᾱ(0) (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return betas_from_alpha_bar(f[1:] / f[0])


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1.0) -> torch.Tensor:
    """ᾱ(t) a rescaled sigmoid of t (Jabri et al. 2022; Chen 2023, 'On the importance of noise scheduling')."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    alpha_bar = ((v_end - v) / (v_end - v_start)).clamp(min=1e-9)
    return betas_from_alpha_bar(alpha_bar.double())


BETAS = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}

NO_FLOAT64 = {"mps"}  # device types without float64: Apple's Metal has none, and moving one there raises


def float_dtype(device: torch.device | str) -> torch.dtype:
    """The widest float a device computes in: float64, or float32 where it has no float64 (NO_FLOAT64)."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64 else torch.float64


def _expand(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> (B, 1, ..., 1) in x's dtype and device, to broadcast over x."""
    return coef.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """Precomputed tensors of one schedule; see the notation table above."""

    betas: torch.Tensor

    @classmethod
    def make(cls, kind: Schedule = "linear", timesteps: int = 1000) -> "NoiseSchedule":
        if kind not in BETAS:
            raise ConfigError(f"unknown schedule {kind!r}; choose one of: {', '.join(BETAS)}")
        if timesteps < 2:
            raise ConfigError(f"timesteps must be at least 2, not {timesteps}")
        return cls(BETAS[kind](timesteps))

    def __post_init__(self) -> None:
        betas = self.betas.double()
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("betas", betas)
        set_("alphas", 1 - betas)
        set_("alpha_bar", alpha_bar)
        set_("alpha_bar_prev", alpha_bar_prev)
        set_("posterior_variance", betas * (1 - alpha_bar_prev) / (1 - alpha_bar))
        set_("snr", alpha_bar / (1 - alpha_bar))
        set_("sigmas", ((1 - alpha_bar) / alpha_bar).sqrt())
        set_("log_sigmas", self.sigmas.log())

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """diffusers' name for `alpha_bar`."""
        return self.alpha_bar

    def gather(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A schedule tensor (e.g. 'snr') at integer steps t, on t's device with no host copy."""
        cache = self.__dict__.setdefault("_on_device", {})
        key = (name, str(t.device))
        if key not in cache:
            cache[key] = getattr(self, name).to(t.device, float_dtype(t.device))
        return cache[key][t]

    # -- continuous time: fractional t interpolates log σ linearly between steps ----------
    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """σ at (possibly fractional) step indices t in [0, T-1]."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            return self.gather("sigmas", t)
        t = t.detach().to(float_dtype(t.device)).clamp(0, self.timesteps - 1)  # on its device: no host sync
        lo = t.floor().long().clamp(max=self.timesteps - 2)
        w = t - lo
        return ((1 - w) * self.gather("log_sigmas", lo) + w * self.gather("log_sigmas", lo + 1)).exp()

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at step indices t: exact for integer t, interpolated in log σ for fractional t."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            return self.gather("alpha_bar", t)
        return 1 / (1 + self.sigma_at(t) ** 2)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional step index whose σ is `sigma` (inverse of sigma_at)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigma = log_sigma.clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.timesteps - 1)
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo + w

    # -- the forward process and the identities between x_0, ε, v ---------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, a draw from q(x_t | x_0) (eq. 4)."""
        ab = _expand(self.alpha_bar_at(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
        ab = _expand(self.alpha_bar_at(t), x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t)."""
        ab = _expand(self.alpha_bar_at(t), x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
        ab = _expand(self.alpha_bar_at(t), x0)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) x_t."""
        ab = _expand(self.alpha_bar_at(t), x_t)
        return ab.sqrt() * v + (1 - ab).sqrt() * x_t

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v."""
        ab = _expand(self.alpha_bar_at(t), x_t)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * v
