"""The U-Net's shapes, sizes and configuration checks."""

import pytest
import torch

from diffuse_cli.config import PRESETS, ConfigError, model_config
from diffuse_cli.device import layout_of
from diffuse_cli.unet import UNet, count_parameters, timestep_embedding


@pytest.mark.parametrize("preset", list(PRESETS))
def test_output_shape_matches_input(preset):
    cfg = model_config(preset, image_size=16 if preset == "tiny" else 32)
    net = UNet(cfg).eval()
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        y = net(x, torch.tensor([0, 999]))
    assert y.shape == x.shape


def test_ddpm_cifar10_has_the_papers_parameter_count():
    # Ho et al. 2020, Appendix B: 35.7M parameters for the CIFAR-10 model.
    assert count_parameters(UNet(model_config("ddpm-cifar10", image_size=32))) == 35_746_307


def test_grayscale_and_fractional_time():
    net = UNet(model_config("tiny", image_size=8, channels=1)).eval()
    with torch.no_grad():
        y = net(torch.randn(3, 1, 8, 8), torch.tensor([0.5, 10.25, 998.9]))
    assert y.shape == (3, 1, 8, 8) and torch.isfinite(y).all()


def test_timestep_embedding_distinguishes_steps():
    e = timestep_embedding(torch.arange(1000), 64)
    assert e.shape == (1000, 64)
    assert torch.cdist(e, e).add(torch.eye(1000) * 10).min() > 1e-3


@pytest.mark.parametrize("size", [0, 6, 30, 2])
def test_image_sizes_the_unet_cannot_halve_are_rejected(size):
    with pytest.raises(ConfigError, match="cannot be halved"):
        model_config("small", image_size=size)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny, small"):
        model_config("huge")


def test_layout_of_follows_the_weights():
    model = UNet(model_config("tiny", image_size=8))
    assert layout_of(model) == torch.contiguous_format
    assert layout_of(model.to(memory_format=torch.channels_last)) == torch.channels_last
