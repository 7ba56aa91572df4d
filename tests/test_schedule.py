"""The schedule and forward process against their closed forms."""

import math

import pytest
import torch

from diffuse_cli.diffusion.schedule import NoiseSchedule


def test_linear_alpha_bar_closed_form():
    # Step t = 500 is the 500th step: index 499. ᾱ_t = ∏_{s=1}^{t} (1 - β_s), β linear 1e-4..0.02.
    s = NoiseSchedule.make("linear", 1000)
    beta = lambda k: 1e-4 + (0.02 - 1e-4) * (k - 1) / 999  # noqa: E731
    expected = math.prod(1 - beta(k) for k in range(1, 501))
    assert s.alpha_bar[499].item() == pytest.approx(expected, rel=1e-12)
    assert round(s.alpha_bar[499].item(), 4) == 0.0786
    assert s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    assert s.alpha_bar[-1].item() == pytest.approx(math.prod(1 - beta(k) for k in range(1, 1001)), rel=1e-10)


def test_cosine_alpha_bar_closed_form():
    s = NoiseSchedule.make("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 100, 500, 900):  # steps where β is not clipped
        assert s.alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_schedules_are_proper(kind):
    s = NoiseSchedule.make(kind, 200)
    assert torch.all(s.betas > 0) and torch.all(s.betas < 1)
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    assert s.alpha_bar[0] > 0.99 and s.alpha_bar[-1] < 0.01
    assert torch.allclose(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    expected_posterior = s.betas * (1 - s.alpha_bar_prev) / (1 - s.alpha_bar)
    assert torch.allclose(s.posterior_variance, expected_posterior)
    assert torch.allclose(s.snr, s.alpha_bar / (1 - s.alpha_bar))


def test_linear_rescales_with_T():
    # Fewer steps with proportionally larger betas keep the end of the process near pure noise.
    assert NoiseSchedule.make("linear", 100).alpha_bar[-1] < 1e-3


def test_q_sample_moments():
    s = NoiseSchedule.make("linear")
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    g = torch.Generator().manual_seed(0)
    for t in (0, 250, 999):
        tt = torch.full((n,), t)
        x = s.q_sample(x0, tt, torch.randn(n, 1, generator=g))
        ab = s.alpha_bar[t].item()
        mean, var = math.sqrt(ab) * 0.7, 1 - ab
        # Standard errors of the sample mean and variance; 5 of them is a false alarm in ~1e-6 runs.
        assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_identities_between_x0_eps_v():
    s = NoiseSchedule.make("cosine")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 990, 998])
    x_t = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0(x_t, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(x_t, t, x0), eps, atol=1e-3)
    assert torch.allclose(s.eps_from_v(x_t, t, s.v_target(x0, t, eps)), eps, atol=1e-5)


def test_fractional_time_interpolates_sigma():
    s = NoiseSchedule.make("linear")
    t = torch.tensor([0, 17, 500, 999])
    assert torch.allclose(s.sigma_at(t.double()), s.sigmas[t])
    assert torch.allclose(s.alpha_bar_at(t.double()), s.alpha_bar[t])
    mid = s.sigma_at(torch.tensor([10.5], dtype=torch.float64))
    assert mid.item() == pytest.approx(math.sqrt(s.sigmas[10].item() * s.sigmas[11].item()))
    sig = torch.tensor([0.05, 1.0, 40.0], dtype=torch.float64)
    assert torch.allclose(s.sigma_at(s.sigma_to_t(sig)), sig)
