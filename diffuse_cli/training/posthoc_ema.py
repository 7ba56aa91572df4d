"""Post-hoc EMA: averages of the training weights kept as power-function profiles, from whose snapshots the EMA of
any length is rebuilt after training (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3 and appendix C; its Algorithms 2 and 3, with time counted in optimizer steps).

| code        | paper      | meaning                                                                          |
|-------------|------------|----------------------------------------------------------------------------------|
| `sigma_rel` | σ_rel      | the EMA's length: the std of its averaging profile over the steps, as a share of them |
| `gamma`     | γ          | the exponent of a power-function profile: step τ ≤ t is weighted ∝ τ^γ (eq. 121) |
| `beta`      | β_γ(t)     | the decay at step t, (1 − 1/t)^(γ+1) (eq. 127): t = 1 copies the weights         |
| `weights`   | p_{t,γ}(τ) | what the average at step T gives the weights θ_τ after each step τ ≤ T           |

With that decay the average at step T is exactly Σ_τ θ_τ (τ^(γ+1) − (τ−1)^(γ+1)) / T^(γ+1) (the product of the
decays from τ+1 to T telescopes to (τ/T)^(γ+1)), so the profile of a stored average is known to the last bit, and
the reconstruction solves for the mix of stored averages whose profile is nearest the one asked for in least
squares over the steps: Algorithm 3 with the sum over steps in place of its integral.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import RunError

# EDM2's two profiles: the shortest and the longest EMA the reconstruction is asked for lie near or between them.
SIGMA_RELS = (0.05, 0.10)
# A run keeps at most this many snapshots, evenly spaced (the spacing doubles as the run grows), and its last one.
MAX_SNAPSHOTS = 16
SNAPSHOT_EVERY = 16  # the first spacing, in steps
SIGMA_REL_MAX = math.sqrt(1 / 12)  # γ = 0, the plain average of every step: no EMA is longer


def sigma_rel_of(gamma: float) -> float:
    """σ_rel of the power-function profile of exponent γ (eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ whose profile has this σ_rel (eq. 126: the largest root of a cubic), by bisection."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"an EMA length (σ_rel) lies between 0 and {SIGMA_REL_MAX:.3f}, not {sigma_rel}")
    low, high = 0.0, 1.0
    while sigma_rel_of(high) > sigma_rel:
        low, high = high, high * 2
    for _ in range(200):  # σ_rel falls as γ grows
        mid = (low + high) / 2
        low, high = (mid, high) if sigma_rel_of(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def beta(step: int, gamma: float) -> float:
    """The decay of the average at `step` (counted from 1): (1 − 1/step)^(γ+1) (eq. 127)."""
    return (1 - 1 / step) ** (gamma + 1)


def weights(step: int, gamma: float, taus: torch.Tensor) -> torch.Tensor:
    """The average at `step` as weights of the steps' θ_τ, at the steps `taus` (float64; zero after `step`)."""
    e = gamma + 1
    w = ((taus / step) ** e - ((taus - 1) / step) ** e)
    return torch.where(taus <= step, w, 0.0)


def coefficients(snapshots: Sequence[tuple[int, float]], step: int, sigma_rel: float,
                 chunk: int = 1 << 16) -> torch.Tensor:
    """The mix of stored averages, (step_i, σ_rel_i), nearest in least squares to the average of length σ_rel
    at `step` (Algorithm 3, summed over the steps); the coefficients sum to 1, as a mean's weights do."""
    gammas = torch.tensor([gamma_of(s) for _, s in snapshots] + [gamma_of(sigma_rel)], dtype=torch.float64)
    ends = [t for t, _ in snapshots] + [step]
    gram = torch.zeros(len(ends), len(ends), dtype=torch.float64)
    for start in range(1, max(ends) + 1, chunk):
        taus = torch.arange(start, min(start + chunk, max(ends) + 1), dtype=torch.float64)
        rows = torch.stack([weights(t, g.item(), taus) for t, g in zip(ends, gammas)])
        gram += rows @ rows.T
    a, b = gram[:-1, :-1], gram[:-1, -1:]
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    return x / x.sum()


def snapshot_spacing(step: int) -> int:
    """The spacing of a run's snapshots once it reaches `step`: SNAPSHOT_EVERY, doubled until MAX_SNAPSHOTS of
    them cover it."""
    every = SNAPSHOT_EVERY
    while step // every > MAX_SNAPSHOTS:
        every *= 2
    return every


def kept_snapshots(steps: Sequence[int], now: int) -> list[int]:
    """Of the snapshots at `steps`, those a run at step `now` keeps: the multiples of the spacing, and `now`'s."""
    spacing = snapshot_spacing(now)
    return [s for s in steps if s % spacing == 0 or s == now]


@torch.no_grad()
def mix(parts: Sequence[dict[str, torch.Tensor]], coefs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_i coefs_i · parts_i, tensor by tensor, in float64 then float32."""
    out = {}
    for name in parts[0]:
        total = sum(c.item() * part[name].double() for c, part in zip(coefs, parts))
        out[name] = total.float()
    return out


class Snapshots:
    """A run's snapshots, read once: the EMA of any length at the newest of them (`rebuild`)."""

    def __init__(self, run: Path):
        from ..formats.snapshots import list_snapshots, load_snapshot

        found = list_snapshots(run)
        if not found:
            raise RunError(f"{run} has no post-hoc EMA snapshots ({run / 'ema'}): it was trained before diffuse "
                           "kept them, or with {posthoc_ema} off", "posthoc_ema")
        self.parts: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        for path in found.values():
            config, info, averages = load_snapshot(path)
            self.parts += [(info["step"], sigma_rel, weights) for sigma_rel, weights in averages.items()]
        self.config, self.info, self.step = config, info, info["step"]  # the newest's

    def rebuild(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The weights of the EMA of length σ_rel at the newest snapshot's step."""
        coefs = coefficients([(step, s) for step, s, _ in self.parts], self.step, sigma_rel)
        return mix([weights for _, _, weights in self.parts], coefs)
