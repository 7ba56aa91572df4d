"""What the network predicts (ε, x_0, v, or EDM's preconditioned F), the training loss, and the ε-model samplers use.

EDM (Karras et al. 2022, Table 1) in this module's VP terms, x_t = α_t x_0 + s_t ε (α² = ᾱ, s² = 1 − ᾱ), whose
VE form x_t / α_t = x_0 + σ_t ε has EDM's noise level σ_t = s_t / α_t (schedule.sigmas):

| EDM                                  | here                                                              |
|--------------------------------------|-------------------------------------------------------------------|
| c_in(σ) = 1 / sqrt(σ² + σ_d²)        | the network sees c_in · x_t / α_t: unit variance at every step      |
| c_skip(σ) = σ_d² / (σ² + σ_d²)       | x̂_0 = c_skip · x_t / α_t + c_out · F                               |
| c_out(σ) = σ σ_d / sqrt(σ² + σ_d²)   | F's target: (x_0 − c_skip (x_0 + σ ε)) / c_out                      |
| λ(σ) = 1 / c_out²                    | the loss on F unweighted (min-SNR-γ does not apply)                 |
| ln σ ~ N(P_mean, P_std²)             | training's steps: the step nearest each σ drawn (training_steps)    |
| c_noise = ¼ ln σ                     | the step t itself, which the network embeds as it does for every objective |

v-prediction is the same preconditioning with σ_d = 1 (F = −v): EDM's σ_d = 0.5, the spread of images in [-1, 1],
makes the network's input and output unit-variance at every noise level.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import Objective
from ..errors import ConfigError
from .schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the objective's prediction
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> ε̂: what every sampler takes


SIGMA_DATA = 0.5  # EDM's σ_d: the standard deviation of images in [-1, 1]
P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal distribution of training noise levels


def edm_coefficients(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, σ_t, α_t) at steps t (fractional too, as the σ-spaced samplers take them), in float64,
    shaped to broadcast against `like`: EDM's Table 1."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    sigma = schedule.sigma_at(t).to(like.device).double().view(shape)
    d2 = sigma ** 2 + SIGMA_DATA ** 2
    return SIGMA_DATA ** 2 / d2, sigma * SIGMA_DATA / d2.sqrt(), d2.rsqrt(), sigma, (1 + sigma ** 2).rsqrt()


def preconditioned(net: Callable[..., torch.Tensor], objective: Objective,
                   schedule: NoiseSchedule) -> Callable[..., torch.Tensor]:
    """The network as it is called at x_t: for edm on c_in · x_t / α_t; as it is for the other objectives."""
    if objective != "edm":
        return net

    def scaled(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        _, _, c_in, _, alpha = edm_coefficients(schedule, t, x)
        return net(x * (c_in / alpha).to(x.dtype), t, *labels)
    return scaled


def target(objective: Objective, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> torch.Tensor:
    """The regression target for x_t = q_sample(x0, t, eps)."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    if objective == "v":
        return schedule.v_target(x0, t, eps)
    if objective == "edm":
        c_skip, c_out, _, sigma, _ = edm_coefficients(schedule, t, x0)
        return ((x0 - c_skip * (x0 + sigma * eps)) / c_out).to(x0.dtype)
    raise ConfigError(f"unknown objective {objective!r}; choose eps, x0, v or edm")


def training_steps(objective: Objective, schedule: NoiseSchedule, n: int, generator: torch.Generator,
                   device: torch.device | str) -> torch.Tensor:
    """The steps a training batch is noised to: uniform over the schedule, or for edm the step nearest each σ of
    EDM's log-normal p_train (ln σ ~ N(P_MEAN, P_STD²))."""
    if objective != "edm":
        return torch.randint(0, schedule.timesteps, (n,), generator=generator, device=device)
    ln_sigma = P_MEAN + P_STD * torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return schedule.sigma_to_t(ln_sigma.exp().cpu()).round().long().clamp(0, schedule.timesteps - 1).to(device)


def loss_weight(objective: Objective, schedule: NoiseSchedule, t: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023), per sample, expressed for each objective; 1 when γ = 0.

    The x_0-space weight min(SNR, γ) becomes min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    """
    if min_snr_gamma <= 0 or objective == "edm":  # EDM's λ(σ) leaves F's loss unweighted
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    snr = schedule.gather("snr", t)
    clipped = snr.clamp(max=min_snr_gamma)
    weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[objective]
    return weight.float()


def diffusion_loss(net: Network, objective: Objective, schedule: NoiseSchedule, x0: torch.Tensor,
                   t: torch.Tensor, eps: torch.Tensor, min_snr_gamma: float = 0.0,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE between the network's output and the objective's target (Ho et al.'s L_simple for ε, γ = 0);
    `labels`: the class of each image, for a conditional network."""
    x_t = schedule.q_sample(x0, t, eps)
    net = preconditioned(net, objective, schedule)
    out = (net(x_t, t) if labels is None else net(x_t, t, labels)).float()
    per_sample = (out - target(objective, schedule, x0, t, eps)).square().flatten(1).mean(1)
    return (loss_weight(objective, schedule, t, min_snr_gamma) * per_sample).mean()


def guided(net: Callable[..., torch.Tensor], labels: torch.Tensor, null: int, scale: float) -> Network:
    """Classifier-free guidance, Ho & Salimans 2022: out_u + w (out_c - out_u), w = `scale`, from one network
    call on the batch twice over, with each image's label and with "no class" (`null`). w = 1 is the plain
    conditional model, w = 0 the unconditional one.

    Whatever the objective, ε̂, x̂_0 and v̂ are affine in the network's output with the same coefficients
    for both halves (the same x_t and t), so guiding the output is guiding ε̂ and x̂_0 alike: one
    stated space, ε (and x̂_0 with it), for every sampler."""
    if scale == 1 or bool((labels == null).all()):
        return lambda x, t: net(x, t, labels)
    unconditional = torch.full_like(labels, null)

    def guided_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, unconditional])).chunk(2)
        return uncond + scale * (cond - uncond)
    return guided_net


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): s = the percentile of |x̂_0| per image (at least 1);
    clip to [-s, s] and divide by s. Strong guidance pushes x̂_0 past [-1, 1]; plain clipping saturates it."""
    s = x0.abs().flatten(1).quantile(percentile, dim=1).clamp(min=1).view(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def as_eps_model(net: Network, schedule: NoiseSchedule, objective: Objective, clip_x0: bool = True,
                 dynamic: bool = False) -> EpsModel:
    """Adapt a network of any objective to the samplers' (x_t, t) -> ε̂; clip_x0 keeps x̂_0 in [-1, 1]
    (`dynamic`: by dynamic thresholding, for strong guidance)."""
    net = preconditioned(net, objective, schedule)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(x, t).float()
        if objective == "edm":
            c_skip, c_out, _, _, alpha = edm_coefficients(schedule, t, x)
            x0 = (c_skip * x / alpha + c_out * out).to(out.dtype)
        elif objective == "eps":
            eps = out
            if not clip_x0:
                return eps
            x0 = schedule.predict_x0(x, t, eps)
        elif objective == "x0":
            x0 = out
        else:
            x0 = schedule.x0_from_v(x, t, out)
        if clip_x0:
            x0 = dynamic_threshold(x0) if dynamic else x0.clamp(-1, 1)
        return schedule.predict_eps(x, t, x0)
    return eps_model
