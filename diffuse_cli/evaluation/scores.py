"""The numbers papers report, from Inception features (inception.py) or pixels: each a function of two sets.

| code                 | paper                                      | what it says                                        |
|----------------------|--------------------------------------------|-----------------------------------------------------|
| `frechet_distance`   | FID, Heusel et al. 2017                    | ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) of the features |
| `kernel_distance`    | KID, Bińkowski et al. 2018                 | unbiased MMD² with k(x, y) = (xᵀy / d + 1)³, over subsets |
| `precision_recall`   | Kynkäänniemi et al. 2019, k = 3            | share of one set inside the other's k-NN balls      |
| `copies`             | Carlini et al. 2023, §5 (CIFAR-10)         | ℓ₂(x̂, x) / (α · mean ℓ₂ to x̂'s n nearest) < δ     |

Features are (N, D) float tensors; every sum is taken in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Carlini et al. 2023's rule for a generated image that copies a training image (their §5, on CIFAR-10): the
# distance to its nearest training image, over α times the mean distance to its n nearest, below δ.
COPY_NEIGHBOURS, COPY_ALPHA, COPY_DELTA = 50, 0.5, 1 / 3


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and the unbiased Σ (divided by N − 1, as numpy.cov) of (N, D) features, in float64."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½ (Heusel et al. 2017, eq. 6).

    tr (Σ₁ Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, which is symmetric and
    positive semi-definite, so symmetric eigendecompositions give it where Σ is singular (fewer images than
    features), where a general matrix square root has to be nudged off the singularity. Eigenvalues at the
    level of rounding (below D·ε of the largest) are the zeros they stand for: their square roots would add
    up to an error of 1e-4 over 2,048 of them."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    diff = mu1 - mu2
    trace_sqrt = _nonzero(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    return max(0.0, float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt))  # ≥ 0 but for rounding


def _nonzero(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Symmetric eigenvalues with those at the level of rounding set to 0."""
    tol = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix."""
    w, v = torch.linalg.eigh(sigma)
    return (v * _nonzero(w).sqrt()) @ v.T


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD² of two equal-sized sets under k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al. 2018, eq. 3).
    The products in float32 (as torch-fidelity computes them: it is most of eval's arithmetic after the network),
    the sums in float64."""
    x, y, d, m = x.float(), y.float(), x.shape[1], len(x)
    kxx, kyy, kxy = ((p @ q.T / d + 1).double() ** 3 for p, q in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID: mmd2 averaged over `subsets` random subsets of `subset_size` drawn from each set (torch-fidelity's
    defaults: 100 of 1,000); (mean, std, the subset size used: the smaller set's size, where that is less)."""
    size = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([mmd2(a[torch.randperm(len(a), generator=g)[:size]],
                                b[torch.randperm(len(b), generator=g)[:size]]) for _ in range(subsets)],
                          dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False)), size


def _kth_neighbour(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set (the 0th nearest is itself)."""
    return torch.cat([torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """The share of `points` within some centre's radius."""
    hits = torch.cat([(torch.cdist(part, centres) <= radii[None]).any(1) for part in points.split(chunk)])
    return float(hits.double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision, the share of `fake` inside some real
    point's ball (its radius: the distance to its k-th nearest real neighbour); recall, the share of `real` inside
    some fake point's ball. k shrinks to fit a set of k points or fewer."""
    real, fake = real.float(), fake.float()
    real_radii = _kth_neighbour(real, min(k, len(real) - 1), chunk)
    fake_radii = _kth_neighbour(fake, min(k, len(fake) - 1), chunk)
    return _inside(fake, real, real_radii, chunk), _inside(real, fake, fake_radii, chunk)


@dataclass(frozen=True)
class Copies:
    """Each sample's nearest reference image (index), its ℓ₂ distance and Carlini's ratio; `copied` where the
    ratio is below δ."""

    nearest: torch.Tensor
    distance: torch.Tensor
    ratio: torch.Tensor
    copied: torch.Tensor


def copies(samples: torch.Tensor, reference: torch.Tensor, neighbours: int = COPY_NEIGHBOURS,
           alpha: float = COPY_ALPHA, delta: float = COPY_DELTA, chunk: int = 256) -> Copies:
    """Carlini et al. 2023 (§5): sample x̂ copies its nearest reference image x when ℓ₂(x̂, x) < δ · α · the mean
    ℓ₂ from x̂ to its `neighbours` nearest reference images (fewer when the reference is smaller). Images are
    uint8 or float (N, ...) of one size; an exact copy has ratio 0."""
    ref = reference.flatten(1).double() / 255
    n = min(neighbours, len(ref))
    nearest, distance, ratio = [], [], []
    for part in samples.flatten(1).double().split(chunk):
        part = part / 255
        candidates = torch.cdist(part, ref).topk(n, dim=1, largest=False).indices
        # cdist's matrix-product form leaves rounding of the order of 1e-8 where images are equal, which differs
        # from CPU to CPU: the n nearest are measured again directly, so that an exact copy is at 0 everywhere
        exact, order = torch.stack([(part - ref[c]).norm(dim=1) for c in candidates.T], 1).sort(dim=1)
        nearest.append(candidates.gather(1, order[:, :1])[:, 0])
        distance.append(exact[:, 0])
        ratio.append(exact[:, 0] / (alpha * exact.mean(1)).clamp(min=1e-12))
    ratio_t = torch.cat(ratio)
    return Copies(torch.cat(nearest), torch.cat(distance), ratio_t, ratio_t < delta)
