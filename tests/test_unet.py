"""The U-Net's shapes, sizes and configuration checks; its attention against the closed form."""

import math

import pytest
import torch

from diffuse_cli.presets import model_config, PRESETS
from diffuse_cli.config import ConfigError
from diffuse_cli.network.device import layout_of
from diffuse_cli.network.fast_ops import upsample_conv
from diffuse_cli.network.unet import Attention, UNet, Upsample, count_parameters, layer_outputs, timestep_embedding


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


@pytest.mark.parametrize("size, message", [(0, "too small"), (2, "too small"), (30, "use 28 or 32"),
                                           (100, "use 96 or 112"), (50, "use 48 or 56")])
def test_image_sizes_the_unet_cannot_halve_are_rejected_naming_sizes_that_work(size, message):
    with pytest.raises(ConfigError, match=message):
        model_config("small", image_size=size)


SCALED = [name for name, fields in PRESETS.items() if "attend_up_to" in fields]


@pytest.mark.parametrize("preset", SCALED)
@pytest.mark.parametrize("size", [16, 24, 32, 48, 64, 96, 128, 192, 256])
def test_scaled_presets_reach_4x4_to_8x8_and_attend_at_16_and_8(preset, size):
    """Issue 39's shape: the deepest level 4x4 to 8x8; attention at 16x16 and 8x8 wherever they are below the top
    level (base and large: 32x32 too, as ADM), and nowhere else."""
    cfg = model_config(preset, image_size=size)
    sides = [size >> level for level in range(len(cfg.channel_mult))]
    assert size % 2 ** (len(sides) - 1) == 0 and 4 <= sides[-1] <= 8
    wanted = {16, 8} | ({32} if preset in ("base", "large") else set())
    if size & (size - 1) == 0:  # a power of two: the sides the recipes name
        assert set(cfg.attention_resolutions) == wanted & set(sides[1:])
    assert size not in cfg.attention_resolutions and all(s > 4 for s in cfg.attention_resolutions)
    assert set(cfg.attention_resolutions) <= set(sides)  # every resolution named occurs


def test_scaled_presets_follow_the_published_multipliers():
    """ADM (Dhariwal & Nichol 2021) at 64, 128 and 256; DDPM's 256 row is the same as ADM's."""
    assert model_config("base", image_size=64).channel_mult == (1, 2, 3, 4)
    assert model_config("base", image_size=128).channel_mult == (1, 1, 2, 3, 4)
    assert model_config("large", image_size=256).channel_mult == (1, 1, 2, 2, 4, 4)
    assert model_config("base", image_size=256).attention_resolutions == (32, 16, 8)


def test_the_builtin_default_network_keeps_its_measured_shape():
    """small at the built-in 16 px is the network docs/training.md's speed and quality were measured on."""
    cfg = model_config("small", image_size=16)
    assert (cfg.channel_mult, cfg.attention_resolutions, cfg.base_channels) == ((1, 2, 2), (8,), 48)
    assert count_parameters(UNet(cfg)) == count_parameters(UNet(model_config(
        "small", image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8,))))


def test_ddpm_cifar10_keeps_its_fixed_shape_at_any_size():
    assert model_config("ddpm-cifar10", image_size=64).channel_mult == (1, 2, 2, 2)
    assert model_config("ddpm-cifar10", image_size=64).attention_resolutions == (16,)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny, small"):
        model_config("huge")


def test_layout_of_follows_the_weights():
    model = UNet(model_config("tiny", image_size=8))
    assert layout_of(model) == torch.contiguous_format
    assert layout_of(model.to(memory_format=torch.channels_last)) == torch.channels_last


def test_upsample_keeps_its_conv_module_keys_and_hooks():
    """Outside code (hooks, LoRA-style wrappers, old checkpoints) sees Upsample.conv as the 3x3 convolution it is."""
    up = Upsample(4)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"} and isinstance(up.conv, torch.nn.Conv2d)
    seen = []
    up.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(up(x), upsample_conv(x, up.conv.weight, up.conv.bias))
    assert seen == [(1, 4, 6, 10)]


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


@pytest.mark.cuda
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


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_hears_the_time_and_the_class(preset):
    """The embedding adds a bias per channel before a GroupNorm; a group of one channel would subtract it again
    (as `tiny` did, with norm_group_min 1: its output did not depend on t)."""
    cfg = model_config(preset, image_size=16 if preset == "tiny" else 32, class_names=("a", "b"))
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    for p in net.parameters():  # the zero-initialised residual branches would hide everything
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        y = {(t, k): net(x, torch.tensor([t]), torch.tensor([k])) for t in (10, 900) for k in (0, 1)}
    assert not torch.allclose(y[10, 0], y[900, 0], atol=1e-4) and not torch.allclose(y[10, 0], y[10, 1], atol=1e-4)
    if preset == "tiny":  # the old grouping, which checkpoints saved before norm_group_min keep
        old = UNet(model_config("tiny", image_size=16, norm_group_min=1)).eval()
        old.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("class_emb")})
        with torch.no_grad():
            assert torch.allclose(old(x, torch.tensor([10])), old(x, torch.tensor([900])), atol=1e-5)


def test_sampling_follows_the_weights_after_a_training_step_or_a_load(monkeypatch):
    """CPU, float32, channels_last, Winograd forced on: sampling keeps each 3x3 convolution's Winograd filters and
    each upsampling's transposed kernel between calls; after an in-place step of the weights, and after
    load_state_dict, its output is a fresh network's of the same weights, exactly, and not the old one's."""
    from diffuse_cli.network import fast_ops

    monkeypatch.setattr(fast_ops, "WINOGRAD", True)
    torch.manual_seed(0)
    cfg = model_config("small", image_size=16)
    net = UNet(cfg).to(memory_format=torch.channels_last).eval()
    for p in net.parameters():  # zero-initialised layers would hide a stale transform
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 700])

    def fresh_output(state):
        other = UNet(cfg).to(memory_format=torch.channels_last).eval()
        other.load_state_dict(state)
        return other(x, t)

    with torch.no_grad():
        before = net(x, t)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # an optimizer's step: in place
        stepped = net(x, t)
        assert not torch.equal(stepped, before)
        assert torch.equal(stepped, fresh_output(net.state_dict()))
        state = {k: v + 0.01 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        assert torch.equal(net(x, t), fresh_output(state))
