"""Every speed trick of fast_ops against the plain PyTorch its docstring names: the same numbers."""

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffuse_cli.network import fast_ops
from diffuse_cli.presets import model_config
from diffuse_cli.network.fast_ops import dropout, ema_update, step_unless, to_device, upsample_conv
from diffuse_cli.network.unet import Attention, UNet


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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_in_training_enlarges_and_convolves_by_winograd_where_it_pays(layout, monkeypatch):
    """CPU, float32, Winograd forced (as winograd_pays chooses it on an AVX2 CPU): with a gradient taken, the
    upsampling is the enlarged image convolved by F(4x4, 3x3), not the transposed convolution, and its values and
    gradients are the float64 plain form's to float32's Winograd rounding; the output keeps x's memory format."""
    from diffuse_cli.network import fast_ops

    monkeypatch.setattr(fast_ops, "WINOGRAD", True)
    torch.manual_seed(0)
    x64 = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(F.interpolate(x64, scale_factor=2.0, mode="nearest"), w64, b64, padding=1)
    grad = torch.randn_like(expected)
    x = x64.detach().float().contiguous(memory_format=layout).requires_grad_()
    weight, bias = (t.detach().float().requires_grad_() for t in (w64, b64))
    transposed = torch.nn.functional.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: pytest.fail("took the transposed convolution"))
    out = upsample_conv(x, weight, bias)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad.float()),
                            torch.autograd.grad(expected, (x64, w64, b64), grad)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-3, rtol=1e-4)
    monkeypatch.setattr(F, "conv_transpose2d", transposed)
    monkeypatch.setattr(fast_ops, "conv3x3", lambda *a, **k: pytest.fail("enlarged"))
    with torch.no_grad():  # sampling keeps the transposed convolution
        torch.testing.assert_close(upsample_conv(x, weight, bias).double(), expected, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(fast_ops, "ENLARGE", False)  # and so does training where told to
    torch.testing.assert_close(upsample_conv(x, weight, bias).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (1, 3, 7, 5), (2, 4, 4, 12), (1, 2, 1, 3)])
def test_winograd_is_a_3x3_convolution_and_so_is_its_gradient(shape):
    """F(4x4, 3x3) in float64 computes the convolution to rounding, whole blocks of 4 or not, and its backward is the
    convolution's (torch's own numerical check of every derivative, and against F.conv2d's)."""
    from diffuse_cli.network import winograd

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out, expected = winograd.conv3x3(x, weight, bias), F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(expected)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad),
                            torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-11, rtol=1e-11)
    assert torch.autograd.gradcheck(winograd.conv3x3, (x, weight, bias))
    shift = torch.randn(shape[0], 6, dtype=torch.float64, requires_grad=True)  # each image's, and a residual
    residual = torch.randn_like(expected, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: winograd.conv3x3(*a[:3], None, *a[3:]), (x, weight, bias, shift, residual))
    with torch.no_grad():  # the path sampling takes, with the filters transformed beforehand
        filters = winograd.transform_filter(weight)
        torch.testing.assert_close(winograd.conv3x3(x, weight, bias, filters), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv3x3_in_float32_is_the_convolution_to_winograds_rounding_in_its_layout(layout, monkeypatch):
    """CPU, float32, whichever way conv3x3 takes (forced both ways): within 2e-5 of the largest output of the
    float64 convolution, gradients too, and the output in the input's memory format."""
    torch.manual_seed(0)
    x = torch.randn(2, 96, 8, 8).contiguous(memory_format=layout).requires_grad_()
    weight = (torch.randn(96, 96, 3, 3) / 30).requires_grad_()
    bias = torch.randn(96, requires_grad=True)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    grad = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, (x, weight, bias), grad)  # float32: back through the casts
    for forced in (True, False):
        monkeypatch.setattr(fast_ops, "WINOGRAD", forced)
        assert fast_ops.winograd_pays(x, weight) is forced
        out = fast_ops.conv3x3(x, weight, bias)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=layout)
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.double(), expected, atol=2e-5 * scale, rtol=0)
        for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad.float()), wanted):
            torch.testing.assert_close(ours, theirs, atol=2e-5 * theirs.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", [(2, 40, 8, 8), (3, 40, 7, 9)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv3x3_adds_each_images_shift_and_the_residual(shape, layout, with_bias, monkeypatch):
    """CPU, float32: conv3x3(x, ..., shift, residual) is the float64 convolution + shift[:, :, None, None] +
    residual (each alone, or both) to Winograd's rounding, whichever way it runs: Winograd with the sums in numba's
    output transform (sampling, filters kept or not) or after autograd's convolution (training), or oneDNN's; the
    gradients of the shift and residual are the output's."""
    from diffuse_cli.network import winograd

    assert winograd.compiled_transforms()
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=layout)
    weight = torch.randn(c, c, 3, 3) / 20
    bias = torch.randn(c) if with_bias else None
    shift, residual = torch.randn(n, c), torch.randn(shape).contiguous(memory_format=layout) * 3
    conv = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    for s, r in ((shift, residual), (shift, None), (None, residual)):
        expected = conv + (0 if s is None else s.double()[:, :, None, None]) + (0 if r is None else r.double())
        scale = expected.abs().max().item()
        for forced in (True, False):
            monkeypatch.setattr(fast_ops, "WINOGRAD", forced)
            with torch.no_grad():
                outs = [fast_ops.conv3x3(x, weight, bias, None, s, r),
                        fast_ops.conv3x3(x, weight, bias, lambda: winograd.transform_filter(weight), s, r)]
            grads = [t.clone().requires_grad_() if t is not None else None for t in (s, r)]
            outs.append(fast_ops.conv3x3(x, weight, bias, None, *grads))
            for out in outs:
                assert out.is_contiguous(memory_format=layout)
                torch.testing.assert_close(out.double(), expected, atol=2e-5 * scale, rtol=0)
            dy = torch.randn(shape)
            got = torch.autograd.grad(outs[-1], [t for t in grads if t is not None], dy)
            wanted = [dy.sum((2, 3)) if t is s else dy for t in (s, r) if t is not None]
            for ours, theirs in zip(got, wanted):
                torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (3, 5, 7, 9), (2, 6, 13, 4), (1, 3, 1, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [True, False])
def test_compiled_transforms_compute_what_the_torch_form_does(shape, layout, with_bias, monkeypatch):
    """CPU, float32: numba's one-pass transforms (winograd_kernels.py) against winograd.py's matrix products, each
    output and gradient within F(4x4, 3x3)'s float32 rounding of the other (1e-5 of the largest; a wrong coefficient
    would be off by a whole term), for images in whole blocks of 4 and not, either memory format, and the sampling
    path with its filters kept."""
    from diffuse_cli.network import winograd

    assert winograd.compiled_transforms()  # numba is a dependency: were it missing, this would compare torch to torch
    torch.manual_seed(0)
    x = torch.randn(*shape).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(7, shape[1], 3, 3, requires_grad=True)
    bias = torch.randn(7, requires_grad=True) if with_bias else None
    shift = torch.randn(shape[0], 7, requires_grad=True)  # its gradient is read in the kernel that transforms dY
    grad = torch.randn(shape[0], 7, *shape[2:])
    results = {}
    for kernels in (False, None):
        monkeypatch.setattr(winograd, "KERNELS", kernels)
        out = winograd.conv3x3(x, weight, bias, None, shift)
        inputs = (x, weight, shift) + ((bias,) if with_bias else ())
        with torch.no_grad():
            kept = winograd.conv3x3(x, weight, bias, winograd.transform_filter(weight))
        results[kernels] = (out, kept, *torch.autograd.grad(out, inputs, grad))
    for ours, theirs in zip(results[None], results[False]):
        torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0)
    assert results[None][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,groups", [((2, 96, 8, 8), 32), ((1, 48, 7, 5), 16), ((3, 8, 16, 16), 1),
                                          ((2, 12, 1, 3), 4)])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_kernels_compute_torchs_group_norm_and_its_gradient(shape, groups, silu):
    """CPU, float32, channels_last: norm_kernels.py's GroupNorm (and SiLU) against F.group_norm (and F.silu) in
    float64, output and the gradients of input, weight and bias within 1e-5 of the largest, for images of one
    position to 256, whole groups of one channel to twelve, with and without autograd; and taken only where
    norm_pays says."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, shape[1])
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert fast_ops.norm_pays(x, norm) and not fast_ops.norm_pays(x.contiguous(), norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_ops.norm_pays(x, norm)
    out = fast_ops.group_norm(x, norm, silu)
    params = (x, norm.weight, norm.bias)
    doubles = [p.detach().double().requires_grad_() for p in params]
    expected = F.group_norm(doubles[0], groups, doubles[1], doubles[2], norm.eps)
    expected = F.silu(expected) if silu else expected
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    with torch.no_grad():  # sampling's path, outside autograd
        torch.testing.assert_close(fast_ops.group_norm(x, norm, silu), out, atol=0, rtol=0)
    grad = torch.randn(shape)
    wanted = torch.autograd.grad(expected, doubles, grad.double())
    for ours, theirs in zip(torch.autograd.grad(out, params, grad), wanted):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0)


def test_the_kernels_silu_is_torchs_across_float32s_range():
    """CPU, float32: norm_kernels.silu (its exp made of a polynomial and the exponent's bits) against F.silu in
    float64, within 2e-6 relative to each value, from −100 (where σ underflows) past +88 (where exp(−z) would);
    and −0 for the tail too small to hold."""
    norm_kernels = pytest.importorskip("diffuse_cli.network.norm_kernels")
    numba = pytest.importorskip("numba")
    z = torch.cat([torch.linspace(-100, 100, 200_001), torch.tensor([-87.5, -87.0, 0.0, 1e-30, -1e-30, 88.5])])
    kernel = norm_kernels.silu

    @numba.njit
    def each(z, out):
        for i in range(z.shape[0]):
            out[i] = kernel(z[i])

    out = torch.empty_like(z)
    each(z.numpy(), out.numpy())
    expected = F.silu(z.double())
    tiny = expected.abs() < 1e-30  # below float32's normal range: σ underflows to zero either way
    assert (out[tiny].abs() < 1e-30).all()
    torch.testing.assert_close(out[~tiny].double(), expected[~tiny], rtol=2e-6, atol=0)


def test_winograd_is_taken_only_where_it_pays(monkeypatch):
    """An AVX2 CPU in fp32: the wider layers of a training step, fewer in sampling, fewer again where the
    transforms are torch's (numba missing); never narrow or 4x4 layers in training, never the image's own 3
    channels, never under autocast, never on an AVX-512 CPU (its oneDNN is faster), whatever the shapes."""
    from diffuse_cli.network import device, winograd

    monkeypatch.setattr(fast_ops, "WINOGRAD", None)
    avx2, avx512 = device.CpuKernels("AVX2", "ALL", False), device.CpuKernels("AVX512", "ALL", True)
    monkeypatch.setattr(device, "cpu_kernels", lambda: avx2)

    def pays(c_in: int, c_out: int, side: int, training: bool) -> bool:
        weight = torch.zeros(c_out, c_in, 3, 3, requires_grad=training)
        return fast_ops.winograd_pays(torch.zeros(1, c_in, side, side), weight)

    # numba's transforms. Training: the harmonic mean of the channels at least 40, from 8x8 up
    assert pays(48, 48, 32, True) and pays(48, 48, 16, True) and pays(64, 64, 8, True) and pays(144, 48, 8, True)
    assert not pays(32, 32, 32, True) and not pays(32, 48, 16, True)  # c = 38.4
    assert not pays(3, 48, 32, True) and not pays(48, 3, 32, True)  # the image's own channels
    assert not pays(256, 256, 4, True)  # 4x4: one block an image
    # sampling: at least 32 channels, times the side at least 256, from 4x4 up
    assert pays(32, 32, 32, False) and pays(32, 32, 8, False) and pays(64, 64, 4, False) and pays(96, 48, 16, False)
    assert not pays(16, 16, 32, False) and not pays(48, 48, 4, False) and not pays(128, 128, 2, False)
    assert not pays(3, 48, 32, False)
    # torch's transforms. Training: c at least 48, times the side at least 1024, from 8x8 up
    monkeypatch.setattr(winograd, "KERNELS", False)
    assert pays(48, 48, 32, True) and pays(64, 64, 16, True) and pays(128, 128, 8, True)
    assert pays(144, 48, 32, True)  # `small`'s widest skip-concatenation into 48 channels
    assert not pays(48, 48, 16, True) and not pays(32, 32, 32, True) and not pays(96, 96, 8, True)
    assert not pays(256, 256, 4, True)
    # sampling: at least 96 channels, and their mean times the side at least 512, from 4x4 up
    assert pays(96, 96, 16, False) and pays(96, 96, 8, False) and pays(128, 128, 4, False)
    assert not pays(64, 64, 32, False) and not pays(96, 96, 4, False) and not pays(128, 128, 2, False)
    monkeypatch.setattr(winograd, "KERNELS", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pays(128, 128, 16, True)
    monkeypatch.setattr(device, "cpu_kernels", lambda: avx512)
    assert not pays(128, 128, 16, True) and not pays(128, 128, 16, False)


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


@pytest.mark.parametrize("side", [4, 16])  # below and above CPU_MATH_POSITIONS
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_computes_the_same_in_either_layout(side, layout, monkeypatch):
    """CPU, float32: the attention layer with q, k and v copied to contiguous channels or left as views gives the
    same output, in the input's memory format; the CPU copies only strided channels above CPU_MATH_POSITIONS
    (a channels_last qkv's views already go to the flash kernel)."""
    torch.manual_seed(0)
    attn = Attention(64, head_channels=32).to(memory_format=layout)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)  # zero-initialised, it would hide the attention
    x = torch.randn(2, 64, side, side).contiguous(memory_format=layout)
    qkv = attn.qkv(x).reshape(2, 3, 2, 32, side * side).transpose(-1, -2)
    strided = layout == torch.contiguous_format
    assert fast_ops.fused_attention_layout(qkv) == (strided and side * side > fast_ops.CPU_MATH_POSITIONS)
    outputs = []
    for contiguous in (True, False):
        monkeypatch.setattr(fast_ops, "fused_attention_layout", lambda qkv: contiguous)
        outputs.append(attn(x))
        assert outputs[-1].is_contiguous(memory_format=layout)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [0.25, 0.0])  # a step, and a skipped one
def test_ema_update_is_a_lerp_of_every_parameter(weight):
    torch.manual_seed(0)
    model, ema, plain = (UNet(model_config("tiny", image_size=8)) for _ in range(3))
    plain.load_state_dict(ema.state_dict())
    ema_update(ema, model, torch.tensor(weight))
    with torch.no_grad():
        for e, p in zip(plain.parameters(), model.parameters()):
            e.lerp_(p, weight)
    for a, b in zip(ema.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_step_unless_steps_exactly_when_not_skipped(fused, skip):
    def stepped(take):
        torch.manual_seed(0)
        model = UNet(model_config("tiny", image_size=8))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
        for step in range(2):  # one step to give the optimizer moments, then the step in question
            model(torch.randn(2, 3, 8, 8), torch.tensor([1, 500])).square().mean().backward()
            take(optimizer) if step else optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()], optimizer.state_dict()["state"]

    ours, our_state = stepped(lambda optimizer: step_unless(optimizer, torch.tensor(skip)))
    plain, plain_state = stepped(lambda optimizer: None if skip else optimizer.step())
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))
    assert our_state.keys() == plain_state.keys()
    for i in our_state:
        assert all(torch.equal(our_state[i][k], plain_state[i][k]) for k in our_state[i])


def test_to_device_on_the_cpu_is_the_tensor_itself():
    x = torch.randn(3, 5)
    assert to_device(x, "cpu") is x  # nothing to copy


@pytest.mark.cuda
def test_to_device_is_a_copy_to_the_gpu():
    x = torch.randn(3, 5)
    y = to_device(x, "cuda")
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)


PROBE = """
import ctypes, resource, torch
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, one fault each, whatever the kernel's THP
from diffuse_cli.network.fast_ops import keep_cpu_memory
def faults_of_later_uses(nbytes, uses=8):
    faults = []
    for _ in range(uses):  # allocate, touch every page, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[1:])  # the fewest of any use after the first: one stray kernel event (once seen in CI,
                            # every page of one use refaulted) cannot decide the test
default = faults_of_later_uses(16 * 2**20)
print(keep_cpu_memory(), default, faults_of_later_uses(16 * 2**20))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_cpu_memory_stops_refaulting_freed_blocks():
    # glibc's threshold pinned at its 128 KiB start: left alone, it adapts to what the process
    # frees first, which made "by default" fault in some runs and not in others.
    # Three fresh processes, the best of them: on a busy machine one whole process has been seen to refault
    # every page (in a full test run, never alone).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    runs = [subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                           env=env).stdout.split() for _ in range(3)]
    applied, default, kept = all(r[0] == "True" for r in runs), min(int(r[1]) for r in runs), min(int(r[2]) for r in runs)
    pages = 16 * 2**20 // 4096
    if max(int(r[1]) for r in runs) == 0:
        pytest.skip("this kernel counts no page faults (gVisor's getrusage, say)")
    assert applied
    assert default > pages // 2  # by default, a fault a page on every use
    assert kept < pages // 20     # kept, later uses find their pages already there


