"""Objectives: the adapters to ε, and min-SNR-γ weights, against their identities."""

import pytest
import torch

from diffuse_cli.diffusion.objectives import as_eps_model, diffusion_loss, loss_weight
from diffuse_cli.diffusion.schedule import NoiseSchedule
from .toy import GaussianMixture

GAUSSIAN = GaussianMixture.gaussian([0.1, -0.2], [[0.1, 0.0], [0.0, 0.05]])


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_adapter_recovers_the_exact_eps(objective):
    s = NoiseSchedule.make("cosine")
    oracle = GAUSSIAN.eps_model(s)

    def network(x, t):  # what an ideal network of this objective outputs
        eps = oracle(x, t).double()
        x0 = s.predict_x0(x.double(), t, eps)
        return {"eps": eps, "x0": x0, "v": s.v_target(x0, t, eps)}[objective]

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.randint(5, 995, (64,), generator=torch.Generator().manual_seed(1))
    got = as_eps_model(network, s, objective, clip_x0=False)(x, t)
    assert torch.allclose(got.double(), oracle(x, t).double(), atol=1e-6)


def test_clip_keeps_predicted_x0_in_range():
    s = NoiseSchedule.make("linear")
    eps_model = as_eps_model(lambda x, t: torch.full_like(x, 5.0), s, "x0", clip_x0=True)
    x, t = torch.zeros(3, 2), torch.tensor([10, 500, 990])
    x0 = s.predict_x0(x, t, eps_model(x, t))
    assert torch.allclose(x0, torch.ones_like(x0), atol=1e-4)


def test_min_snr_weights_make_objectives_agree():
    # The same error in x_0 costs SNR times more in ε and (SNR + 1) times more in v; min-SNR-γ
    # weights bring all three to min(SNR, γ) · ||x̂_0 - x_0||² (Hang et al. 2023, eq. 6-8).
    s = NoiseSchedule.make("linear")
    t = torch.tensor([5, 100, 300, 600, 950])
    snr = s.snr[t].float()
    for objective, scale in (("eps", snr), ("x0", torch.ones_like(snr)), ("v", snr + 1)):
        weighted = loss_weight(objective, s, t, 5.0) * scale
        assert torch.allclose(weighted, snr.clamp(max=5.0), rtol=1e-5)
    assert torch.equal(loss_weight("eps", s, t, 0.0), torch.ones(5))


def test_loss_is_zero_for_a_perfect_network():
    s = NoiseSchedule.make("cosine")
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 50, 400, 999])
    perfect = lambda x_t, tt: s.v_target(x0, tt, eps)  # noqa: E731
    assert diffusion_loss(perfect, "v", s, x0, t, eps, 5.0).item() < 1e-10
    assert diffusion_loss(lambda x_t, tt: torch.zeros_like(x_t), "v", s, x0, t, eps).item() > 0.1
