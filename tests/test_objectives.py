"""Objectives: the adapters to ε, and min-SNR-γ weights, against their identities."""

import math

import pytest
import torch

from diffuse_cli.diffusion.objectives import as_eps_model, diffusion_loss, edm_coefficients, loss_weight, target
from diffuse_cli.diffusion.schedule import NoiseSchedule
from .toy import GaussianMixture

GAUSSIAN = GaussianMixture.gaussian([0.1, -0.2], [[0.1, 0.0], [0.0, 0.05]])


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "edm"])
def test_adapter_recovers_the_exact_eps(objective):
    s = NoiseSchedule.make("cosine")
    oracle = GAUSSIAN.eps_model(s)

    def network(x, t):  # what an ideal network of this objective outputs
        if objective == "edm":  # shown c_in · x_t / α_t (objectives.preconditioned): x_t back first
            _, _, c_in, _, alpha = edm_coefficients(s, t, x)
            x = x * alpha / c_in
        eps = oracle(x, t).double()
        x0 = s.predict_x0(x.double(), t, eps)
        return {"eps": eps, "x0": x0, "v": s.v_target(x0, t, eps), "edm": target("edm", s, x0, t, eps)}[objective]

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


def test_edm_preconditioning_is_karras_table_1_in_vp_terms():
    """x̂_0 = c_skip (x_0 + σ ε) + c_out F*, with F* the edm target: the denoiser D gives x_0 back exactly; the network
    sees c_in (x_0 + σ ε), of unit variance for data of std σ_d; and at σ_d = 1 the target is -v (float64)."""
    from diffuse_cli.diffusion import objectives

    s = NoiseSchedule.make("cosine")
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    g = torch.Generator().manual_seed(0)
    x0 = objectives.SIGMA_DATA * torch.randn(6, 2000, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2000, generator=g, dtype=torch.float64)
    c_skip, c_out, c_in, sigma, alpha = objectives.edm_coefficients(s, t, x0)
    f = target("edm", s, x0, t, eps)
    torch.testing.assert_close(c_skip * (x0 + sigma * eps) + c_out * f, x0, rtol=0, atol=1e-9)
    x_t = s.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t / alpha, x0 + sigma * eps, rtol=0, atol=1e-9)
    assert torch.allclose((c_in * (x0 + sigma * eps)).std(1), torch.ones(6, dtype=torch.float64), atol=0.05)
    assert torch.allclose(f.std(1), torch.ones(6, dtype=torch.float64), atol=0.05)  # unit-variance target, too
    sigma_data = objectives.SIGMA_DATA
    try:
        objectives.SIGMA_DATA = 1.0
        torch.testing.assert_close(target("edm", s, x0, t, eps), -s.v_target(x0, t, eps), rtol=0, atol=1e-9)
    finally:
        objectives.SIGMA_DATA = sigma_data


def test_edm_adapter_and_loss_see_the_network_at_c_in_x():
    """The network called at c_in · x_t / α_t (what it was trained on), and the loss of the exact F is zero."""
    from diffuse_cli.diffusion import objectives

    s = NoiseSchedule.make("cosine")
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1, 50, 400, 999])
    seen = []

    def perfect(x_in, tt):
        seen.append(x_in)
        return target("edm", s, x0, tt, eps)

    assert diffusion_loss(perfect, "edm", s, x0, t, eps, 5.0).item() < 1e-12
    _, _, c_in, sigma, _ = objectives.edm_coefficients(s, t, x0)
    torch.testing.assert_close(seen[0], c_in * (x0 + sigma * eps), rtol=0, atol=1e-9)


def test_edm_trains_on_log_normal_noise_levels():
    """ln σ of the steps drawn is N(-1.2, 1.2²) (EDM's p_train), to the schedule's rounding to a step."""
    from diffuse_cli.diffusion.objectives import training_steps

    s = NoiseSchedule.make("cosine")
    t = training_steps("edm", s, 200_000, torch.Generator().manual_seed(0), "cpu")
    ln_sigma = s.sigmas[t].log()
    assert abs(ln_sigma.mean().item() + 1.2) < 0.02 and abs(ln_sigma.std().item() - 1.2) < 0.02
    uniform = training_steps("v", s, 200_000, torch.Generator().manual_seed(0), "cpu")
    assert abs(uniform.float().mean().item() - 499.5) < 3


def test_an_edm_model_trains_samples_and_is_not_exported(tmp_path):
    """The edm objective end to end on a tiny network (CPU, fp32): a finite loss, samples, and export refused in one
    line, as no diffusers scheduler scales the network's input."""
    import diffuse_cli as diffuse
    from diffuse_cli.errors import UsageError

    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = diffuse.train(images, steps=4, batch_size=4, objective="edm", precision="fp32", base_channels=32,
                          channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=32)
    assert all(math.isfinite(r["loss"]) for r in model.training.records)
    assert model.sample(2, steps=3).shape == (2, 3, 16, 16)
    assert model.sample(2, steps=3, spacing="karras").shape == (2, 3, 16, 16)  # fractional steps
    with pytest.raises(UsageError, match="EDM's preconditioning"):
        diffuse.export_diffusers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
