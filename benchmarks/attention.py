"""One attention layer of a preset, forward and backward: SDPA's math path against its fused kernels.

`diffuse` hands SDPA q, k and v with contiguous channels on GPUs, so that it may pick a fused
kernel (flash, memory-efficient or cuDNN), and on the CPU above 8x8 positions where they are strided
(contiguous NCHW memory); up to 8x8 the CPU keeps the strided views, which only the math path takes
(`fast_ops.fused_attention_layout`). A channels_last image's q, k and v have contiguous channels
as they come, and go to the flash kernel uncopied. This measures the choice for NCHW memory:

    strided   the views as the CPU gets them (math path)
    fused     contiguous q, k, v, SDPA's own pick among the fused kernels
    math      contiguous q, k, v, math path forced

    python benchmarks/attention.py                      # both presets' layers, batch 16 and 64, fp32 and bf16
    python benchmarks/attention.py --presets small --batches 16
    python benchmarks/attention.py --presets small --image-sizes 32 64 128 --batches 16   # larger layers

`--channels-last` measures the layer on channels_last memory, as `diffuse` runs it on a CPU without
AVX-512, whose q, k and v views have contiguous channels already: `views` (as they come, SDPA's own
pick) against `copied` (made contiguous first); `--sampling` times the forward alone, without gradients.

    python benchmarks/attention.py --presets small --image-sizes 64 --batches 16 --precisions fp32 --channels-last --sampling
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import grid_parser, machine_line, parse_grid, synchronizer, timed  # noqa: E402

from diffuse_cli.network import fast_ops

from diffuse_cli.network import unet  # noqa: E402
from diffuse_cli.presets import model_config  # noqa: E402
from diffuse_cli.network.device import autocast  # noqa: E402

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
VARIANTS = {"strided": (False, [SDPBackend.MATH]), "fused": (True, FUSED), "math": (True, [SDPBackend.MATH])}
CHANNELS_LAST_VARIANTS = {"views": (False, FUSED + [SDPBackend.MATH]), "copied": (True, FUSED + [SDPBackend.MATH])}


def first_attention(preset: str, image_size: int) -> tuple[unet.Attention, torch.Size]:
    """The preset's first attention layer at this image size, and the input shape it sees (one forward pass). A
    scaled preset is built as it was when docs/training.md's figures were measured, three levels with attention at
    the second, so that --image-sizes 32 64 128 give layers at 8x8, 16x16 and 32x32 positions."""
    fixed = {} if preset == "ddpm-cifar10" else dict(channel_mult=(1, 2, 2), attention_resolutions=(image_size // 4,))
    model = unet.UNet(model_config(preset, image_size=image_size, **fixed))
    attn = next(m for m in model.modules() if isinstance(m, unet.Attention))
    shapes = []
    hook = attn.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size), torch.zeros(1))
    hook.remove()
    return attn, shapes[0]


def layer_seconds(preset: str, image_size: int, batch: int, precision: str, dev: torch.device,
                  variant: str, channels_last: bool = False, sampling: bool = False) -> float | None:
    """Median seconds of the preset's attention layer, forward and backward (the forward alone, without gradients,
    where `sampling`); None where no kernel takes it."""
    torch.manual_seed(0)
    attn, shape = first_attention(preset, image_size)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    attn = attn.to(dev, memory_format=layout)
    x = torch.randn(batch, *shape[1:], device=dev).contiguous(memory_format=layout).requires_grad_(not sampling)
    contiguous, backends = (CHANNELS_LAST_VARIANTS if channels_last else VARIANTS)[variant]
    fast_ops.fused_attention_layout = lambda qkv: contiguous  # noqa: E731  (this process only)

    def run() -> None:
        with autocast(precision, dev), sdpa_kernel(backends), torch.set_grad_enabled(not sampling):
            y = attn(x)
        if not sampling:
            y.float().sum().backward()
            x.grad = None
            attn.zero_grad(set_to_none=True)
    try:
        run()
    except RuntimeError:  # "No available kernel": e.g. no fused CPU kernel for this dtype
        return None
    return timed(run, repeats=21, warmup=3, sync=synchronizer(dev))


def main() -> None:
    parser = grid_parser(__doc__)
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[32],
                        help="image sizes; the layer measured is at a quarter of the size (8x8 at 32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory: its views against copies, both to SDPA's own pick")
    parser.add_argument("--sampling", action="store_true", help="the forward alone, without gradients")
    args = parse_grid(parser)
    dev = torch.device(args.device)
    variants = CHANNELS_LAST_VARIANTS if args.channels_last else VARIANTS
    what = "forward without gradients" if args.sampling else "forward + backward"
    print(f"{machine_line(args.device)}; ms per layer, {what}" + (", channels_last" if args.channels_last else ""))
    print(f"{'preset':<13}{'image':>6}{'layer':>6}{'batch':>6}{'prec':>6} | " + "".join(f"{v:>10}" for v in variants))
    for preset, size in ((p, s) for p in args.presets for s in args.image_sizes):
        layer = first_attention(preset, size)[1][-1]
        for batch in args.batches:
            for precision in args.precisions:
                cells = [layer_seconds(preset, size, batch, precision, dev, v, args.channels_last, args.sampling)
                         for v in variants]
                print(f"{preset:<13}{size:>6}{layer:>6}{batch:>6}{precision:>6} | "
                      + "".join(f"{s * 1e3:>10.2f}" if s is not None else f"{'-':>10}" for s in cells), flush=True)


if __name__ == "__main__":
    main()
