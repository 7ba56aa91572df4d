"""The U-Net's shapes, sizes and configuration checks; its upsampling and attention against closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffuse_cli.config import PRESETS, ConfigError, model_config
from diffuse_cli.device import layout_of
from diffuse_cli.unet import (Attention, UNet, Upsample, count_parameters, dropout, layer_outputs, timestep_embedding,
                              upsample_conv)


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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_is_a_convolution_of_the_upsampled_image(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = upsample_conv(x, weight, bias)
    assert out.shape == (2, 7, 6, 8) and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(expected)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad),
                            torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_upsample_keeps_its_conv_module_keys_and_hooks():
    """Outside code (hooks, LoRA-style wrappers, old checkpoints) sees Upsample.conv as the 3x3 convolution it is."""
    up = Upsample(4)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"} and isinstance(up.conv, torch.nn.Conv2d)
    seen = []
    up.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(up(x), upsample_conv(x, up.conv.weight, up.conv.bias))
    assert seen == [(1, 4, 6, 10)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_dropout_drops_each_element_with_probability_p_and_keeps_the_mean(layout):
    p = 0.1
    kept_scale = 1 / (1 - round(p * 2**16) / 2**16)  # p rounded to 16 bits, within 2^-17 of it
    torch.manual_seed(0)
    x = torch.rand(8, 32, 64, 64, dtype=torch.float64).add(0.5).contiguous(memory_format=layout).requires_grad_()  # 1M elements, none 0
    torch.manual_seed(1)
    out = dropout(x, p)
    assert out.is_contiguous(memory_format=layout)
    ratio = (out / x).detach()
    dropped = ratio == 0
    torch.testing.assert_close(ratio[~dropped], torch.full_like(ratio[~dropped], kept_scale), rtol=1e-12, atol=0)
    # Four draws share each 64-bit word: every position within a word, and pairs in one word or
    # across words, must drop with probabilities p and p² (5 standard errors).
    flat = dropped.permute(0, 2, 3, 1).flatten() if layout == torch.channels_last else dropped.flatten()
    by_position = flat.view(-1, 4).double()
    for rate, expected in [*zip(by_position.mean(0), [p] * 4),
                           ((by_position[:, 0] * by_position[:, 1]).mean(), p * p),
                           ((by_position[:-1, 3] * by_position[1:, 0]).mean(), p * p)]:
        assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / len(by_position))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, ratio)  # d out / d x is the mask times the scale
    torch.manual_seed(1)
    assert torch.equal(dropout(x, p), out) and not torch.equal(dropout(x, p), out)  # seeded, fresh each call
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


def attention_by_hand(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """x + proj(softmax(q k^T / sqrt(d)) v) per head, written out with einsum."""
    B, C, H, W = x.shape
    d = C // attn.heads
    q, k, v = attn.qkv(attn.norm(x)).float().reshape(B, 3, attn.heads, d, H * W).unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(B, C, H, W)
    return x + attn.proj(out.to(x.dtype))


def random_attention(device: str) -> Attention:
    torch.manual_seed(0)
    attn = Attention(64, head_channels=32).to(device)  # two heads
    torch.nn.init.normal_(attn.proj.weight, std=0.2)  # zero-initialised, it would hide the attention
    return attn


@pytest.mark.parametrize("side", [4, 16])  # the CPU's math path on strided views; its flash kernel
def test_attention_is_the_softmax_of_scaled_dot_products(side):
    attn = random_attention("cpu")
    x = torch.randn(3, 64, side, side)
    torch.testing.assert_close(attn(x), attention_by_hand(attn, x), atol=1e-5, rtol=1e-5)


def test_large_attention_on_the_cpu_runs_the_flash_kernel():
    """Above 8x8 positions the CPU gets contiguous q, k, v, so that SDPA may take its flash kernel, which
    never holds the (HW x HW) scores; with only that kernel allowed, the strided views would raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = random_attention("cpu")
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        y = attn(x)
        y.square().sum().backward()
    torch.testing.assert_close(y, attention_by_hand(attn, x), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused attention kernels are GPU kernels")
def test_attention_runs_the_fused_kernels_on_a_gpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = random_attention("cuda")
    x = torch.randn(3, 64, 8, 8, device="cuda", requires_grad=True)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(fused):  # no math fallback allowed
        y = attn(x)
    y.float().square().sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = attention_by_hand(attn, x)
    torch.testing.assert_close(y.float(), expected.float(), atol=0.05, rtol=0.05)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layer_outputs_counts_every_layer_of_a_whole_batch_and_leaves_the_model_as_it_was():
    model = UNet(model_config("tiny", image_size=8, dropout=0.5)).train()
    leaves = [m for m in model.modules() if not any(m.children())]
    counts = []
    for module in leaves:
        module.register_forward_hook(lambda module, args, out: counts.append(out.numel()))
    with torch.no_grad():
        model(torch.zeros(3, 3, 8, 8), torch.zeros(3))
    whole_batch = sum(counts)
    rng = torch.get_rng_state()
    assert layer_outputs(model, 3) == whole_batch  # counted on one image, scaled to three
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # no dropout draw, mode kept
    assert all(len(m._forward_hooks) == 1 for m in leaves)  # only the test's own: layer_outputs' are removed
