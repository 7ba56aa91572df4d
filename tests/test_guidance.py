"""Class-conditional models and classifier-free guidance, against closed forms and on a trained model.

One Gaussian per class makes every ε exact: the conditional ε of class k is its component's, the
unconditional one the mixture's (toy.GaussianMixture). Guidance mixes them as Ho & Salimans (2022) do.
"""

import math

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.diffusion.objectives import as_eps_model, dynamic_threshold, guided
from diffuse_cli.diffusion.samplers import SAMPLERS, CallCounter, sample, spaced_timesteps, steps_for_nfe
from diffuse_cli.diffusion.schedule import NoiseSchedule
from .toy import GaussianMixture

from .test_samplers import CONVERGED, N

COMPONENTS = [GaussianMixture.gaussian([-0.5, 0.3], [[0.05, 0.0], [0.0, 0.08]]),
              GaussianMixture.gaussian([0.6, -0.2], [[0.10, 0.0], [0.0, 0.04]])]
MIXTURE = GaussianMixture(torch.tensor([0.5, 0.5], dtype=torch.float64),
                          torch.cat([c.means for c in COMPONENTS]), torch.cat([c.covs for c in COMPONENTS]))
NULL = len(COMPONENTS)


def class_network(schedule, classes=COMPONENTS, unconditional=MIXTURE, calls=None):
    """An exact 'network' (x_t, t, labels) -> ε: each row's class component, or for NULL the unconditional data."""
    eps_c = [c.eps_model(schedule) for c in classes]
    eps_u = unconditional.eps_model(schedule)

    def net(x, t, labels):
        if calls is not None:
            calls.append(len(x))
        out = eps_u(x, t).clone()
        for k, eps in enumerate(eps_c):
            rows = labels == k
            if rows.any():
                out[rows] = eps(x[rows], t[rows])
        return out
    return net


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_with_guidance_1_every_sampler_draws_the_class_asked_for(sampler):
    schedule = NoiseSchedule.make("cosine")
    for k, component in enumerate(COMPONENTS):
        labels = torch.full((N,), k)
        model = as_eps_model(guided(class_network(schedule), labels, NULL, 1.0), schedule, "eps", clip_x0=False)
        steps = steps_for_nfe(sampler, CONVERGED[sampler])
        x = sample(model, (N, 2), schedule, sampler, steps, torch.Generator().manual_seed(k)).double()
        # as test_samplers' Gaussian: 4 Monte Carlo standard errors plus 0.01 of the sampler's own error
        assert torch.allclose(x.mean(0), component.mean(), atol=4 * math.sqrt(0.1 / N) + 0.01), (k, x.mean(0))
        assert torch.allclose(torch.cov(x.T), component.covariance(), atol=4 * 0.1 * math.sqrt(2 / N) + 0.01), k


def test_without_a_class_a_conditional_model_draws_the_unconditional_data():
    schedule = NoiseSchedule.make("cosine")
    model = as_eps_model(guided(class_network(schedule), torch.full((N,), NULL), NULL, 4.0), schedule, "eps",
                         clip_x0=False)  # every image "no class": guidance has nothing to push
    x = sample(model, (N, 2), schedule, "dpm++2m", 100, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(x.mean(0), MIXTURE.mean(), atol=0.02)
    assert torch.allclose(torch.cov(x.T), MIXTURE.covariance(), atol=0.02)


def guided_flow_end(schedule, timesteps, x_T, w, unconditional, conditional):
    """Where the probability-flow ODE of guided ε takes x_T, then denoised, for two Gaussians with diagonal
    covariances: the guided distribution is Gaussian too, and along each axis this is exact.

    In x̃ = x / sqrt(ᾱ) a Gaussian N(μ, s²) has ε = σ (x̃ - μ) / (s² + σ²), so the guided ODE
    dx̃/dσ = (1-w) ε_u + w ε_c is linear: dx̃/dσ = a(σ) x̃ - c(σ), with a = σ((1-w)/(s_u²+σ²) + w/(s_c²+σ²))
    and c = σ((1-w) μ_u/(s_u²+σ²) + w μ_c/(s_c²+σ²)). With A = ½((1-w) ln(s_u²+σ²) + w ln(s_c²+σ²)), whose
    derivative is a, x̃(σ_min) = e^A(σ_min) (x̃_T e^-A(σ_T) + ∫ c e^-A dσ over [σ_min, σ_T]); the samplers then
    return the guided x̂_0 = x̃ - σ_min ε_g there."""
    mu_u, s2_u = unconditional.means[0], unconditional.covs[0].diagonal()
    mu_c, s2_c = conditional.means[0], conditional.covs[0].diagonal()
    s_T, s_min = schedule.sigma_at(timesteps[:1]).item(), schedule.sigma_at(timesteps[-1:]).item()
    A = lambda s: 0.5 * ((1 - w) * torch.log(s2_u + s**2) + w * torch.log(s2_c + s**2))  # noqa: E731
    c = lambda s: s * ((1 - w) * mu_u / (s2_u + s**2) + w * mu_c / (s2_c + s**2))  # noqa: E731
    grid = torch.logspace(math.log10(s_min), math.log10(s_T), 200_001, dtype=torch.float64)[:, None]
    integral = torch.trapezoid(c(grid) * torch.exp(-A(grid)), grid[:, 0], dim=0)
    s_min_t, s_T_t = torch.tensor(s_min, dtype=torch.float64), torch.tensor(s_T, dtype=torch.float64)
    x = torch.exp(A(s_min_t)) * (x_T * math.sqrt(1 + s_T**2) * torch.exp(-A(s_T_t)) + integral)
    eps = s_min * ((1 - w) * (x - mu_u) / (s2_u + s_min**2) + w * (x - mu_c) / (s2_c + s_min**2))
    return x - s_min * eps


@pytest.mark.parametrize("w", [2.0, 4.0])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "dpm++3m", "unipc", "heun"])
def test_with_guidance_above_1_deterministic_samplers_reach_the_guided_gaussian(sampler, w):
    """The guided distribution of two Gaussians is Gaussian: its mean and spread are the closed form's, to an
    error that shrinks with the steps (the SDE solvers reach another Gaussian, by another path)."""
    schedule = NoiseSchedule.make("linear")
    unconditional, conditional = MIXTURE_AS_ONE, COMPONENTS[1]
    net = class_network(schedule, classes=[conditional], unconditional=unconditional)
    x_T = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # the map is affine: mean and slope
    errors = []
    for steps in (20, 80):
        ts = spaced_timesteps(schedule, steps, "logsnr")
        model = as_eps_model(guided(net, torch.zeros(2, dtype=torch.long), 1, w), schedule, "eps", clip_x0=False)
        got = SAMPLERS[sampler].fn(model, x_T, schedule, ts)
        want = guided_flow_end(schedule, ts, x_T, w, unconditional, conditional)
        errors.append((got - want).abs().max().item())
    assert errors[1] < errors[0] and errors[1] < 0.01, errors


MIXTURE_AS_ONE = GaussianMixture.gaussian([0.05, 0.05], [[0.2, 0.0], [0.0, 0.1]])  # a Gaussian unconditional


def test_guidance_is_one_network_call_per_step_on_the_batch_twice_over():
    schedule = NoiseSchedule.make("cosine")
    calls = []
    net = class_network(schedule, calls=calls)
    counter = CallCounter()
    model = counter.wrap(as_eps_model(guided(net, torch.zeros(8, dtype=torch.long), NULL, 3.0), schedule, "eps"))
    sample(model, (8, 2), schedule, "dpm++3m-sde", 10, torch.Generator().manual_seed(0))
    assert counter.done == 10 and calls == [16] * 10


def test_dynamic_thresholding_leaves_images_in_range_and_rescales_the_rest():
    x = torch.tensor([[0.5, -0.9, 0.2, 0.99], [3.0, -1.5, 0.5, 0.0]])
    out = dynamic_threshold(x, percentile=1.0)
    assert torch.equal(out[0], x[0])  # already within [-1, 1]
    assert torch.allclose(out[1], x[1] / 3.0) and out.abs().max() <= 1


def test_a_model_trained_on_red_and_blue_draws_each_when_asked():
    red, blue = torch.zeros(32, 3, 8, 8, dtype=torch.uint8), torch.zeros(32, 3, 8, 8, dtype=torch.uint8)
    red[:, 0], blue[:, 2] = 230, 230
    data = diffuse.ImageData.from_tensor(torch.cat([red, blue]), torch.tensor([0] * 32 + [1] * 32), ("red", "blue"))
    model = diffuse.train(data, preset="tiny", steps=100, batch_size=16, warmup=10, lr=3e-3, precision="fp32",
                          hflip=True)
    assert model.config.model.class_names == ("red", "blue")
    for name, channel in (("red", 0), ("blue", 2)):
        for w in (1.0, 3.0):
            means = model.sample(8, classes=name, steps=10, seed=1, guidance=w).float().mean((2, 3))  # (8, 3)
            assert (means[:, channel] > means[:, 2 - channel] + 150).all(), (name, w, means)
    with pytest.raises(diffuse.DiffuseError, match="unknown class 'green'; this model's classes are: red, blue"):
        model.sample(2, classes="green")


def write_classes(root, counts):
    from .conftest import write_image

    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i}.png", seed=hash((name, i)) % 1000)
    return root


def test_train_on_subfolders_learns_their_classes_and_sample_draws_them_by_name(run_cli, tmp_path, monkeypatch):
    import json

    from PIL import Image

    from .conftest import assert_clean_error

    monkeypatch.chdir(tmp_path)
    write_classes(tmp_path / "pets", {"cat": 6, "dog": 5, "fox": 2})
    args = ["--model", "tiny", "--image-size", "8", "--batch-size", "4", "--steps", "2"]
    trained = run_cli("train", "pets", *args, "--out", "run")
    said = " ".join(trained.err.split())
    assert trained.code == 0 and "classes 3: cat (6), dog (5), fox (2) --classes off" in said, trained
    assert "class 'fox' has only 2 images" in said
    facts = json.loads(run_cli("inspect", "run", "--json").out)
    assert facts["config"]["model"]["class_names"] == ["cat", "dog", "fox"] and facts["class_counts"]["dog"] == 5
    assert "dog (5 images)" in " ".join(run_cli("inspect", "run").out.split())

    drawn = run_cli("sample", "--checkpoint", "run", "--class", "dog", "--class", "0", "-n", "2", "--steps", "2",
                    "--guidance", "3", "--out", "drawn")
    assert drawn.code == 0 and "each on the batch twice over (guidance)" in drawn.out, drawn
    assert sorted(p.name for p in (tmp_path / "drawn").glob("0*.png")) == ["0000-dog.png", "0001-dog.png",
                                                                           "0002-cat.png", "0003-cat.png"]
    one = run_cli("sample", "--checkpoint", "run", "--class", "fox", "-n", "2", "--steps", "2", "--out", "one")
    assert one.code == 0 and "wrote 2 images (all fox, guidance 1) and grid.png (one row) to one/" in one.out, one
    every = run_cli("sample", "--checkpoint", "run", "--class", "all", "-n", "3", "--steps", "2", "--out", "all")
    assert every.code == 0 and "a row of each class" in every.out
    side = (3 * (8 + 2) + 2) * 8  # 3 rows (one a class) of 3 images of 8 pixels, 2 between, all enlarged 8x
    assert Image.open(tmp_path / "all" / "grid.png").size == (side, side)
    plain = run_cli("sample", "--checkpoint", "run", "-n", "2", "--steps", "2", "--out", "plain")  # no class: any image
    assert plain.code == 0 and sorted(p.name for p in (tmp_path / "plain").glob("0*.png")) == ["0000.png", "0001.png"]
    assert_clean_error(run_cli("sample", "--checkpoint", "run", "--class", "wolf", "--out", "x"),
                       "unknown class 'wolf'", "cat, dog, fox")
    assert not (tmp_path / "x").exists()

    off = run_cli("train", "pets", *args, "--classes", "off", "--out", "off")
    assert off.code == 0 and "classes 3" not in " ".join(off.err.split())
    assert_clean_error(run_cli("sample", "--checkpoint", "off", "--class", "dog"), "trained without classes")
    assert_clean_error(run_cli("train", "pets", *args, "--classes", "sometimes"), "unknown classes 'sometimes'")


def test_a_checkpoint_from_before_classes_loads_and_samples_unchanged(tmp_path):
    """Configs written before these fields existed (class_names, norm_group_min, classes, class_dropout) read as
    an unconditional model with the old normalisation."""
    import json

    from safetensors.torch import load_file, save_file

    from diffuse_cli.formats.checkpoint import read_header
    from diffuse_cli.config import Config
    from diffuse_cli.presets import model_config
    from diffuse_cli.network.unet import UNet

    config = Config(preset="small", model=model_config("small", image_size=8))
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    diffuse.Model(UNet(config.model).eval(), config, {"step": 1}).save(path)
    meta = read_header(path)["__metadata__"]
    old = json.loads(meta["config"])
    for section, key in (("model", "class_names"), ("model", "norm_group_min"), ("train", "classes"),
                         ("train", "class_dropout"), ("train", "hflip")):
        del old[section][key]
    old["train"]["hflip"] = True
    save_file(load_file(path), tmp_path / "old.safetensors", metadata={**meta, "config": json.dumps(old)})
    new, before = diffuse.load(path, "cpu"), diffuse.load(tmp_path / "old.safetensors", "cpu")
    assert before.config.model.class_names == () and before.config.model.norm_group_min == 1
    assert torch.equal(before.sample(3, steps=3), new.sample(3, steps=3))


def test_with_no_class_asked_each_image_draws_its_class_as_often_as_the_data_had_it():
    from diffuse_cli.diffusion.denoiser import random_classes

    weights = torch.tensor([600.0, 300.0, 100.0, 0.0])  # three classes, no image without one
    drawn = random_classes(7, 6000, 3, weights)
    assert torch.equal(drawn[100:200], random_classes(107, 100, 3, weights))  # image i's own: seed + i
    share = torch.bincount(drawn, minlength=4) / 6000.0
    assert torch.allclose(share, weights / weights.sum(), atol=4 * math.sqrt(0.25 / 6000))
