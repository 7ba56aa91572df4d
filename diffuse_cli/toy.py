"""Data whose noisy score is known exactly: a mixture of Gaussians, and its optimal ε-model.

If x_0 ~ Σ_k w_k N(μ_k, Σ_k) then x_t ~ Σ_k w_k N(sqrt(ᾱ_t) μ_k, ᾱ_t Σ_k + (1 - ᾱ_t) I), and the
ideal denoiser is ε*(x_t, t) = -sqrt(1 - ᾱ_t) ∇ log q(x_t). Samplers run on ε* should reproduce
the mixture: tests and benchmarks use it to measure a sampler alone, without a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule


@dataclass(frozen=True)
class GaussianMixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor    # (K, d)
    covs: torch.Tensor     # (K, d, d)

    @classmethod
    def gaussian(cls, mean: list[float], cov: list[list[float]]) -> "GaussianMixture":
        return cls(torch.ones(1, dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
                   torch.tensor([cov], dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """Law of total covariance: E[Σ_k + μ_k μ_kᵀ] - m mᵀ."""
        m = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - m[:, None] * m[None, :]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + (chol[k] @ z[:, :, None])[:, :, 0]

    def eps_model(self, schedule: NoiseSchedule):
        """The exact ε-predictor (x_t, t) -> ε* for this mixture under `schedule`; x is (B, d)."""
        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Each distinct t (a sampler passes one) needs its K covariances inverted once.
            t_unique, row = torch.unique(torch.as_tensor(t).cpu(), return_inverse=True)
            ab = schedule.alpha_bar_at(t_unique).double()[:, None, None, None]          # (U, 1, 1, 1)
            eye = torch.eye(self.dim, dtype=torch.float64)
            cov = ab * self.covs[None] + (1 - ab) * eye                                # (U, K, d, d)
            precision, log_det = torch.linalg.inv(cov).to(x.device), torch.logdet(cov).to(x.device)
            ab, row = ab[:, 0, 0, 0].to(x.device)[row], row.to(x.device)             # (B,)
            diff = x.double()[:, None, :] - ab[:, None, None].sqrt() * self.means[None].to(x.device)  # (B, K, d)
            solved = torch.einsum("bkij,bkj->bki", precision[row], diff)              # C⁻¹(x - m)
            log_p = -0.5 * ((diff * solved).sum(-1) + log_det[row])                   # (B, K)
            resp = torch.softmax(log_p + self.weights.log().to(x.device)[None], dim=1)
            score = -(resp[..., None] * solved).sum(1)                                 # ∇ log q(x_t)
            return (-(1 - ab)[:, None].sqrt() * score).to(x.dtype)
        return eps


def mixture_2d() -> GaussianMixture:
    """Three well separated, unequal modes in 2-D: the benchmark's and the tests' target."""
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[-0.6, -0.4], [0.6, -0.3], [0.0, 0.6]], dtype=torch.float64),
        covs=torch.tensor([[[0.02, 0.005], [0.005, 0.01]], [[0.01, 0.0], [0.0, 0.03]],
                           [[0.015, -0.005], [-0.005, 0.015]]], dtype=torch.float64),
    )


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (n, d)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = ((points.double() @ dirs).T.contiguous().sort(1).values for points in (a, b))  # (projections, n)
    return (pa - pb).abs().mean().item()
