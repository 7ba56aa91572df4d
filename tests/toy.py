"""Data whose noisy score is known exactly: a mixture of Gaussians, and its optimal ε-model.

If x_0 ~ Σ_k w_k N(μ_k, Σ_k) then x_t ~ Σ_k w_k N(sqrt(ᾱ_t) μ_k, ᾱ_t Σ_k + (1 - ᾱ_t) I), and the
ideal denoiser is ε*(x_t, t) = -sqrt(1 - ᾱ_t) ∇ log q(x_t). Samplers run on ε* should reproduce
the mixture: tests and benchmarks use it to measure a sampler alone, without a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffuse_cli.diffusion.schedule import NoiseSchedule


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

    def conditional(self, known: list[int], value: torch.Tensor) -> "GaussianMixture":
        """The mixture of the other coordinates given x[known] = value: each component's Gaussian conditional
        μ_u + Σ_uk Σ_kk⁻¹ (a - μ_k), Σ_uu - Σ_uk Σ_kk⁻¹ Σ_ku, reweighted by how likely it makes the value."""
        k = torch.tensor(known)
        u = torch.tensor([i for i in range(self.dim) if i not in known])
        a = torch.as_tensor(value, dtype=torch.float64)
        s_kk, s_uk, s_uu = self.covs[:, k][:, :, k], self.covs[:, u][:, :, k], self.covs[:, u][:, :, u]
        gain = s_uk @ torch.linalg.inv(s_kk)                                           # (K, u, k)
        diff = a[None] - self.means[:, k]                                              # (K, k)
        log_w = self.weights.log() + torch.distributions.MultivariateNormal(self.means[:, k], s_kk).log_prob(a[None])
        return GaussianMixture(torch.softmax(log_w, 0), self.means[:, u] + (gain @ diff[:, :, None])[:, :, 0],
                               s_uu - gain @ s_uk.transpose(1, 2))

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


def _directions(dim: int, projections: int, seed: int) -> torch.Tensor:
    dirs = torch.randn(dim, projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return dirs / dirs.norm(dim=0, keepdim=True)  # (d, projections), unit columns


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (n, d)."""
    dirs = _directions(a.shape[1], projections, seed)
    pa, pb = ((points.double() @ dirs).T.contiguous().sort(1).values for points in (a, b))  # (projections, n)
    return (pa - pb).abs().mean().item()


def sliced_wasserstein_to(target: GaussianMixture, points: torch.Tensor, projections: int = 256, seed: int = 0,
                          grid: int = 8192) -> float:
    """Sliced 1-Wasserstein distance from a point cloud (n, d) to the mixture itself, not to a draw of it.

    Along a unit direction u the mixture is the 1-D mixture Σ_k w_k N(uᵀμ_k, uᵀΣ_k u), whose CDF F
    is exact, and W1 = ∫ |F_n(x) - F(x)| dx (midpoint rule on `grid` cells). Only the points carry
    sampling noise, so the floor (E W1 of n exact draws, ~0.6/sqrt(n) here) is about 1/sqrt(2) of
    what two point clouds give, and it is the same for every sampler.
    """
    dirs = _directions(points.shape[1], projections, seed)
    proj = dirs.T @ points.double().T                                                 # (P, n)
    means = target.means @ dirs                                                       # (K, P)
    stds = torch.einsum("dp,kde,ep->kp", dirs, target.covs, dirs).sqrt()             # (K, P)
    lo = torch.minimum(proj.min(1).values, (means - 8 * stds).min(0).values)
    hi = torch.maximum(proj.max(1).values, (means + 8 * stds).max(0).values)
    cells = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    x = lo[:, None] + (hi - lo)[:, None] * 0.5 * (cells[1:] + cells[:-1])[None]     # (P, grid) midpoints
    # F_n at the midpoints by counting, not sorting: bin j holds the points in (mid_{j-1}, mid_j].
    cell = ((proj - lo[:, None]) / (hi - lo)[:, None] * grid - 0.5).ceil().long().clamp(0, grid)
    cell += (grid + 1) * torch.arange(projections)[:, None]
    counts = torch.bincount(cell.flatten(), minlength=(grid + 1) * projections).view(projections, grid + 1)
    empirical = counts[:, :-1].cumsum(1) / proj.shape[1]
    exact = (target.weights[:, None, None] * torch.special.ndtr((x[None] - means[..., None]) / stds[..., None])).sum(0)
    return ((empirical - exact).abs().mean(1) * (hi - lo)).mean().item()
