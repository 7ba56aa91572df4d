"""What the network predicts (ε, x_0 or v), the training loss, and the ε-model samplers use."""

from __future__ import annotations

from typing import Callable

import torch

from .config import Objective
from .errors import ConfigError
from .schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the objective's prediction
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> ε̂: what every sampler takes


def target(objective: Objective, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> torch.Tensor:
    """The regression target for x_t = q_sample(x0, t, eps)."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    if objective == "v":
        return schedule.v_target(x0, t, eps)
    raise ConfigError(f"unknown objective {objective!r}; choose eps, x0 or v")


def loss_weight(objective: Objective, schedule: NoiseSchedule, t: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023), per sample, expressed for each objective; 1 when γ = 0.

    The x_0-space weight min(SNR, γ) becomes min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    """
    if min_snr_gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    snr = schedule.gather("snr", t)
    clipped = snr.clamp(max=min_snr_gamma)
    weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[objective]
    return weight.float()


def diffusion_loss(net: Network, objective: Objective, schedule: NoiseSchedule, x0: torch.Tensor,
                   t: torch.Tensor, eps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Weighted MSE between the network's output and the objective's target (Ho et al.'s L_simple for ε, γ = 0)."""
    x_t = schedule.q_sample(x0, t, eps)
    out = net(x_t, t).float()
    per_sample = (out - target(objective, schedule, x0, t, eps)).square().flatten(1).mean(1)
    return (loss_weight(objective, schedule, t, min_snr_gamma) * per_sample).mean()


def as_eps_model(net: Network, schedule: NoiseSchedule, objective: Objective, clip_x0: bool = True) -> EpsModel:
    """Adapt a network of any objective to the samplers' (x_t, t) -> ε̂; clip_x0 keeps x̂_0 in [-1, 1]."""
    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(x, t).float()
        if objective == "eps":
            eps = out
            if not clip_x0:
                return eps
            x0 = schedule.predict_x0(x, t, eps)
        elif objective == "x0":
            x0 = out
        else:
            x0 = schedule.x0_from_v(x, t, out)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        return schedule.predict_eps(x, t, x0)
    return eps_model
