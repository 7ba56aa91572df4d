"""Editing against closed forms (SDEdit, RePaint's inpainting, DDIM inversion) and on a trained model.

With Gaussian data N(m, S) everything is exact. SDEdit from an init a at k forward steps (ᾱ = ᾱ_k,
C = ᾱ S + (1 - ᾱ) I) draws x_0 from ∫ p(x_0 | x_k) q(x_k | a) dx_k: mean m + ᾱ S C⁻¹ (a - m), covariance
S - ᾱ S C⁻¹ S + ᾱ (1 - ᾱ) S C⁻² S. Inpainting coordinate 2 given coordinate 1 = a has the Gaussian
conditional as its answer (toy.GaussianMixture.conditional).
"""

import math

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.images.data import load_builtin
from diffuse_cli.images.decode import read_image
from diffuse_cli.images.pictures import save_png
from diffuse_cli.diffusion.editing import (ddim_invert, edit, plan_edit, repaint_stretches, slerp, start_step,
                                 steps_below)
from diffuse_cli.errors import DiffuseError
from diffuse_cli.diffusion.samplers import SAMPLERS, ddim, spaced_timesteps, steps_for_nfe
from diffuse_cli.diffusion.schedule import NoiseSchedule
from .toy import GaussianMixture

from .conftest import assert_clean_error
from .test_samplers import CONVERGED

GAUSSIAN = GaussianMixture.gaussian([0.5, -0.3], [[0.2, 0.12], [0.12, 0.1]])  # correlated: the known half informs
N = 10_000
TINY = dict(preset="tiny", batch_size=4, warmup=1, precision="fp32")
IMAGES = load_builtin(8, n=12).images  # uint8 (12, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return diffuse.train(IMAGES, steps=6, **TINY)


def test_strength_is_forward_steps_and_the_path_continues_on_the_samplers_own_steps():
    ts = spaced_timesteps(NoiseSchedule.make("cosine"), 10, "trailing")  # 999, 899, ..., 99
    assert start_step(0.6, 1000) == 600 and start_step(1e-4, 1000) == 0
    assert steps_below(ts, 600, 1000).tolist() == [599, 499, 399, 299, 199, 99]  # 599 is one of its own
    assert steps_below(ts, 1000, 1000) is ts
    assert steps_below(ts, 610, 1000).tolist() == [609, 499, 399, 299, 199, 99]  # 599 is 10 below: too close
    assert steps_below(ts, 650, 1000).tolist() == [649, 599, 499, 399, 299, 199, 99]
    assert plan_edit(ts, 1000, 1e-4).stretches == []  # nothing to do: the init comes back


def test_repaint_stretches_follow_its_jump_schedule():
    """Lugmayr et al.'s schedule over 6 steps, j = 2: having reached positions 4 and 6 (the clean image) it goes
    back 2 and down again, `jumps` times; never back to the pure-noise start."""
    assert repaint_stretches(6, 2, 2) == [(0, 4), (2, 4), (2, 4), (4, 6), (4, 6), (4, 6)]
    assert repaint_stretches(6, 0, 2) == [(0, 4), (4, 6)]
    assert repaint_stretches(3, 1, 1) == [(0, 2), (1, 2), (2, 3), (2, 3)]


def sdedit_moments(init: torch.Tensor, ab: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, S = GAUSSIAN.means[0], GAUSSIAN.covs[0]
    eye = torch.eye(2, dtype=torch.float64)
    C_inv = torch.linalg.inv(ab * S + (1 - ab) * eye)
    mean = m + ab * S @ C_inv @ (init - m)
    cov = S - ab * S @ C_inv @ S + ab * (1 - ab) * S @ C_inv @ C_inv @ S
    return mean, cov


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m-sde"])
@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_sdedit_with_the_exact_eps_draws_the_data_given_the_noised_init(sampler, strength):
    schedule = NoiseSchedule.make("cosine")
    ts = spaced_timesteps(schedule, steps_for_nfe(sampler, CONVERGED[sampler]), SAMPLERS[sampler].spacing)
    plan = plan_edit(ts, 1000, strength)
    init = torch.tensor([1.2, 0.4], dtype=torch.float64)  # off the data: SDEdit pulls it in
    x = edit(sampler, GAUSSIAN.eps_model(schedule), init.expand(N, 2), schedule, plan,
             generator=torch.Generator().manual_seed(0)).double()
    mean, cov = sdedit_moments(init, schedule.alpha_bar[plan.k - 1].item())
    # 4 standard errors (sd at most 0.45, so 0.0045 for the mean, 0.2·sqrt(2/N) for a covariance) plus 0.01 of
    # the sampler's own error once converged, as test_samplers allows
    assert torch.allclose(x.mean(0), mean, atol=4 * 0.0045 + 0.01), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=4 * 0.2 * math.sqrt(2 / N) + 0.01)
    assert (mean - init).norm() > 0.2  # and that is far from the init: the test can tell


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sdedit_at_strength_1_is_ordinary_sampling_and_near_0_returns_the_init(model, sampler):
    init = IMAGES[3]
    plain = model.sample(3, sampler=sampler, steps=4, seed=7)
    assert torch.equal(model.sample(3, init=init, strength=1.0, sampler=sampler, steps=4, seed=7), plain)
    assert torch.equal(model.sample(2, init=init, strength=1e-4, sampler=sampler, steps=4), init.expand(2, -1, -1, -1))
    far, near = (model.sample(4, init=init, strength=s, sampler=sampler, steps=4).float() for s in (0.9, 0.02))
    assert (near - init).abs().mean() < (far - init).abs().mean() / 3


def test_ddim_inversion_then_ddim_reconstructs_to_an_error_that_falls_with_steps():
    schedule = NoiseSchedule.make("linear")
    eps = GAUSSIAN.eps_model(schedule)
    x0 = GAUSSIAN.sample(2000, torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 50, 250):
        ts = spaced_timesteps(schedule, steps, "trailing")
        x_T = ddim_invert(eps, x0, schedule, ts)
        errors.append((ddim(eps, x_T, schedule, ts) - x0).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 < errors[0], errors
    # the probability-flow ODE carries the data to N(0, I) at T: what inversion reached is noise
    assert torch.allclose(x_T.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.1)
    assert torch.allclose(torch.cov(x_T.T), torch.eye(2, dtype=torch.float64), atol=0.1)


def test_inpainting_a_gaussian_approaches_the_exact_conditional_with_repaints_jumps():
    """The kept coordinate comes back exactly. Without resampling the fill sits between the unconditional
    and the conditional answer; RePaint's jumps bring it in: at T steps and 9 jumps, within 4 standard
    errors plus the method's own remaining bias (measured: mean off by 0.058 without jumps, 0.007 with 9;
    variance 39% high without, 0.1% with). benchmarks/inpainting.py measures it on the mixture."""
    schedule = NoiseSchedule.make("cosine")
    ts = spaced_timesteps(schedule, 1000, "trailing")
    exact = GAUSSIAN.conditional([0], torch.tensor([0.9]))
    mean, var = exact.means[0, 0].item(), exact.covs[0, 0, 0].item()
    init = torch.tensor([[0.9, 0.0]], dtype=torch.float64).expand(N, 2)
    generate = torch.tensor([[False, True]]).expand(N, 2)
    results = {}
    for jumps in (0, 9):
        x = edit("ddpm", GAUSSIAN.eps_model(schedule), init, schedule, plan_edit(ts, 1000, 1.0, True, jumps),
                 generate, torch.Generator().manual_seed(0))
        assert torch.equal(x[:, 0], init[:, 0])
        results[jumps] = x[:, 1].mean().item(), x[:, 1].var().item()
    se_mean, se_var = math.sqrt(var / N), var * math.sqrt(2 / N)
    assert abs(results[0][0] - mean) > 0.04  # the plain replacement method is biased...
    assert abs(results[9][0] - mean) < 4 * se_mean + 0.005, results  # ...and resampling removes it
    assert abs(results[9][1] - var) < 4 * se_var + 0.1 * var, results


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpainting_keeps_every_kept_pixel_exactly_on_every_sampler(model, sampler):
    generate = torch.zeros(8, 8, dtype=torch.bool)
    generate[2:6, 3:7] = True
    init = IMAGES[5]
    out = model.sample(3, init=init, mask=generate, sampler=sampler, steps=4, resample_jumps=2)
    assert torch.equal(out[:, :, ~generate], init[:, ~generate].expand(3, -1, -1))
    assert (out[:, :, generate].float() - init[:, generate].float()).abs().mean() > 2  # and it made the rest anew


def test_slerp_keeps_a_noise_norm_where_a_straight_line_shrinks_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    middle = slerp(a, b, 0.5)
    assert middle.norm() / a.norm() == pytest.approx(1, abs=0.05) and (0.5 * (a + b)).norm() / a.norm() < 0.8


def test_interpolation_between_seeds_starts_and_ends_on_their_ddim_samples(model):
    frames = diffuse.interpolate(model, frames=5, seeds=(3, 17), steps=6)
    assert frames.shape == (5, 3, 8, 8) and frames.dtype == torch.uint8
    for frame, seed in ((frames[0], 3), (frames[-1], 17)):
        alone = model.sample(1, sampler="ddim", steps=6, eta=0.0, seed=seed)[0]
        assert (frame.int() - alone.int()).abs().max() <= 1  # the same, to rounding of the slerp's weights
    assert not torch.equal(frames[2], frames[0]) and not torch.equal(frames[2], frames[-1])


def test_edit_inputs_are_read_as_training_reads_them_and_bad_ones_refused(model, tmp_path):
    save_png(IMAGES[0].repeat_interleave(4, 1).repeat_interleave(4, 2), tmp_path / "big.png")  # 32x32
    wide = torch.zeros(1, 8, 16, dtype=torch.uint8)
    wide[:, :, 8:] = 255  # the right half is white: generate there
    save_png(wide, tmp_path / "wide_mask.png")
    inputs = model.edit_inputs(tmp_path / "big.png", tmp_path / "wide_mask.png")
    assert inputs.images.shape == (1, 3, 8, 8) and any("resized" in note for note in inputs.notes)
    assert inputs.generate[0, 0, :, 4:].all() and not inputs.generate[0, 0, :, :4].any()
    save_png(torch.zeros(1, 8, 8, dtype=torch.uint8), tmp_path / "black.png")
    (tmp_path / "notes.txt").write_text("not an image")
    gray = diffuse.train(IMAGES[:, :1], steps=1, **TINY)
    for call, words in ((lambda: model.edit_inputs(tmp_path / "big.png", tmp_path / "black.png"), "nothing to generate"),
                        (lambda: model.edit_inputs(tmp_path / "notes.txt"), "cannot read as an image"),
                        (lambda: model.edit_inputs(tmp_path / "nope.png"), "no such file"),
                        (lambda: gray.edit_inputs(tmp_path / "big.png"), "colour"),
                        (lambda: model.edit_inputs(tmp_path / "black.png"), "grayscale image"),  # 1 channel, model 3
                        (lambda: model.edit_inputs(torch.zeros(1, 8, 8, dtype=torch.uint8)), r"takes uint8 \(3, 8, 8\)"),
                        (lambda: model.sample(1, init=IMAGES[0], strength=0), "strength"),
                        (lambda: model.sample(1, mask=tmp_path / "wide_mask.png"), "^mask needs .* with init$")):
        with pytest.raises(DiffuseError, match=words):
            call()


def test_the_cli_edits_inpaints_and_interpolates_and_refuses_bad_input_without_writing(run_cli, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    diffuse.train(IMAGES, out=tmp_path / "checkpoints" / "run", steps=2, **TINY)
    for i in range(2):
        save_png(IMAGES[i], tmp_path / f"{'ab'[i]}.png")
    hole = torch.zeros(1, 4, 4, dtype=torch.uint8)
    hole[:, 1:3, 1:3] = 255
    save_png(hole, tmp_path / "hole.png")
    save_png(torch.zeros(1, 8, 8, dtype=torch.uint8), tmp_path / "black.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, words in ((["sample", "--init", "a.png", "--strength", "1.5"], ["strength"]),
                        (["sample", "--init", "a.png", "--strength", "0"], ["--strength must be in (0, 1]"]),
                        (["sample", "--init", "a.png", "--mask", "black.png"], ["nothing to generate"]),
                        (["sample", "--init", "nope.png"], ["no such file"]),
                        (["sample", "--mask", "hole.png"], ["--init"]),
                        (["sample", "--strength", "0.5"], ["--init"]),
                        (["sample", "--init", "a.png", "--resample-jumps", "3"], ["--mask"]),
                        (["sample", "--init", "a.png", "--mask", "hole.png", "--resample-jumps", "-1"], ["resample"]),
                        (["interpolate", "a.png"], ["two images"]),
                        (["interpolate"], ["two images"]),
                        (["interpolate", "a.png", "nope.png"], ["no such file"])):
        result = run_cli(*args)
        assert result.code == 2, (args, result)
        assert_clean_error(result, *words)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args  # nothing written

    result = run_cli("sample", "--init", "a.png", "--strength", "0.5", "-n", "3", "--steps", "4")
    assert result.code == 0, result
    folder = next((tmp_path / "samples").glob("*-init-a-s0.5"))
    assert sorted(p.name for p in folder.iterdir()) == ["0000-a.png", "0001-a.png", "0002-a.png", "grid.png"]
    assert "strength 0.5" in result.out and "t = 500 of 1000" in result.out

    result = run_cli("sample", "--init", "a.png", "--mask", "hole.png", "-n", "2", "--steps", "4")
    assert result.code == 0 and "resized" in result.err and "inpainted 25%" in result.out, result
    folder = next((tmp_path / "samples").glob("*-mask-hole-jumps*"))
    keep = read_image(tmp_path / "hole.png", 1)[0].repeat_interleave(2, 0).repeat_interleave(2, 1) < 128
    assert torch.equal(read_image(folder / "0001-a.png")[:, keep], IMAGES[0][:, keep])

    (tmp_path / "inits").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "inits" / name).write_bytes((tmp_path / name).read_bytes())
    (tmp_path / "inits" / "notes.txt").write_text("not an image")
    result = run_cli("sample", "--init", "inits", "--strength", "0.3", "--steps", "4", "--trajectory")
    assert result.code == 0 and "skipped 1 of 3" in result.err and "2 images of inits" in result.out, result
    folder = next((tmp_path / "samples").glob("*-init-inits-s0.3"))  # one edit of each image, by default
    assert {p.name for p in folder.iterdir()} == {"0000-a.png", "0001-b.png", "grid.png", "trajectory.png",
                                                  "trajectory.gif"}

    result = run_cli("interpolate", "a.png", "b.png", "--frames", "4", "--steps", "3")
    assert result.code == 0, result
    folder = tmp_path / "samples" / "run-interpolate-a-b-3steps"
    assert {"0000.png", "0003.png", "strip.png", "strip.gif"} <= {p.name for p in folder.iterdir()}
    result = run_cli("interpolate", "--seeds", "3", "17", "--frames", "3", "--steps", "3")
    assert result.code == 0 and "seeds 3 and 17" in result.out, result


def test_an_edit_asks_a_conditional_model_for_no_class_unless_told_one():
    """Without --class the init decides what it becomes: the "no class" half, not a class drawn at random."""
    from diffuse_cli.diffusion.denoiser import generate

    data = diffuse.ImageData.from_tensor(IMAGES, torch.tensor([0, 1] * 6), ("a", "b"))
    model = diffuse.train(data, steps=2, **TINY)
    edited = model.sample(3, init=IMAGES[2], strength=0.7, steps=4, seed=1)
    null = torch.full((3,), 2)
    plain, _ = generate(model.net, model.config, 3, steps=4, seed=1, labels=null,
                        init=IMAGES[2].expand(3, -1, -1, -1), strength=0.7)
    assert torch.equal(edited, plain)
    asked = model.sample(3, init=IMAGES[2], strength=0.7, steps=4, seed=1, classes="b")
    assert not torch.equal(asked, edited)


@pytest.mark.parametrize("sampler", ["heun", "dpm++3m-sde"])
def test_a_plan_counts_the_network_calls_its_path_makes(sampler):
    """The progress bar's total: heun makes one call more on a stretch that ends at a noisy step."""
    from diffuse_cli.diffusion.samplers import CallCounter

    schedule = NoiseSchedule.make("cosine")
    ts = spaced_timesteps(schedule, 10, SAMPLERS[sampler].spacing)
    plan = plan_edit(ts, 1000, 0.7, inpaint=True, jumps=2)
    calls = CallCounter()
    counted = calls.wrap(GAUSSIAN.eps_model(schedule))
    init = torch.zeros(4, 2, dtype=torch.float64)
    edit(sampler, counted, init, schedule, plan, torch.tensor([[False, True]]).expand(4, 2),
         torch.Generator().manual_seed(0))
    assert calls.done == plan.nfe(sampler) > len(plan.timesteps)


def test_generate_reports_the_calls_an_edit_made_not_those_of_ordinary_sampling(model):
    from diffuse_cli.diffusion.denoiser import SampleHooks, generate

    seen = []
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[..., 4:] = True
    images, nfe = generate(model.net, model.config, 4, sampler="heun", steps=6, batch_size=2, init=IMAGES[:4],
                           strength=0.6, generate=mask, resample_jumps=1,
                           hooks=SampleHooks(progress=lambda done, total: seen.append(done)))
    settings = diffuse.SampleConfig(diffuse.SamplerChoice("heun", 6), strength=0.6, resample_jumps=1)
    assert images.shape == (4, 3, 8, 8)
    planned = model.request(1, settings, model.edit_inputs(IMAGES[:4], mask)).nfe(model.schedule())
    assert nfe == planned == len(seen) // 2  # two batches
    assert nfe != SAMPLERS["heun"].nfe(6)
