"""Training and sampling speed of our U-Net, side by side with diffusers' UNet2DModel.

For the `small` and `ddpm-cifar10` presets at 32x32 and batch 16 and 64, in fp32 and bf16
autocast: training images/s (forward, backward, clip, AdamW, EMA), sampling network calls/s,
peak memory, achieved GFLOP/s and its share of this machine's practical peak (the fastest of
10 runs of a large 3x3 convolution, measured in the same process just before, since this
machine's speed drifts by 10-20% over minutes). diffusers (the `bench` extra) gets the same
architecture, batch, precision and training step, and the ratio ours/theirs is printed.
Each measurement runs in a fresh process, so that peak memory is its own, and times the
steady state (after 8 warm-up steps), as a long training run sees it.

Each side runs as its tool ships: ours is `diffuse train`'s own step (fused AdamW; on a GPU
replayed as one CUDA graph; on the CPU with malloc keeping freed memory); diffusers' is a plain
eager step with torch's default AdamW and malloc, as its example training script runs.
`--same-runtime` gives diffusers our step as well, so that the ratio compares the networks alone.

    pip install -e '.[bench]'
    python benchmarks/train_speed.py                 # everything (about 20 minutes on 2 CPU cores)
    python benchmarks/train_speed.py --presets small --batches 16
    python benchmarks/train_speed.py --presets small --batches 64 --precisions bf16 --compile
    python benchmarks/train_speed.py --same-runtime      # networks alone
    python benchmarks/train_speed.py --presets small --rounds 3   # 3 pairs of runs, back to back; median ratio
    python benchmarks/train_speed.py --isa avx2 --batches 16 --rounds 3   # an AVX-512/AMX machine as AVX2 runs

Without --precisions, bf16 rows are measured only where the CPU computes bf16 natively: elsewhere torch emulates
it, ~5x slower than fp32, and the default grid would take hours. A measurement whose process fails or outlasts
--timeout is printed as such, with the reason, and the grid goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from queue import Empty
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import grid_parser, machine_line, parse_grid, step_flops, synchronizer, timed, train_step_fn  # noqa: E402

from diffuse_cli.presets import model_config  # noqa: E402
from diffuse_cli.network.device import autocast, cpu_kernels, memory_format  # noqa: E402
from diffuse_cli.network.fast_ops import keep_cpu_memory  # noqa: E402
from diffuse_cli.network.graphs import graphed_forward  # noqa: E402
from diffuse_cli.network.unet import UNet, count_parameters  # noqa: E402


def diffusers_unet(preset: str, image_size: int = 32):
    """diffusers' UNet2DModel with the preset's architecture (attention at the same resolutions)."""
    from diffusers import UNet2DModel

    cfg = model_config(preset, image_size=image_size)
    attn_levels = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(len(cfg.channel_mult))]
    return UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)),
        attention_head_dim=cfg.head_channels, norm_num_groups=16 if cfg.base_channels % 32 else 32,
        dropout=cfg.dropout, time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1)


WARMUP_STEPS = 8  # glibc's own mmap threshold takes ~8 steps to settle where it is left alone


def contestant(impl: str, preset: str, batch: int, precision: str, dev: torch.device, our_runtime: bool,
               image_size: int = 32):
    """(model, net, x0, t, eps, optimizer) for "ours" or "diffusers" at a preset's architecture:
    each in its own memory format, with torch's AdamW (as diffusers' training script runs) unless
    `our_runtime` (optimizer None: train_step_fn then takes our step)."""
    torch.manual_seed(0)
    if impl == "ours":
        model = net = UNet(model_config(preset, image_size=image_size)).to(dev,
                                                                          memory_format=memory_format(dev, precision))
    else:
        model = diffusers_unet(preset, image_size).to(dev)
        net = lambda x, t: model(x, t).sample  # noqa: E731
    fmt = memory_format(dev, precision) if impl == "ours" else torch.contiguous_format
    x0 = torch.rand(batch, 3, image_size, image_size, device=dev).mul(2).sub(1).contiguous(memory_format=fmt)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (batch,), device=dev)
    optimizer = None if our_runtime else torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    return model, net, x0, t, eps, optimizer


def measure(impl: str, preset: str, batch: int, precision: str, device: str, compile: bool, our_runtime: bool,
            cuda_graph: bool, image_size: int, queue) -> None:
    dev = torch.device(device)
    if our_runtime and dev.type == "cpu":
        keep_cpu_memory()
    model, net, x0, t, eps, optimizer = contestant(impl, preset, batch, precision, dev, our_runtime, image_size)
    sync = synchronizer(dev)
    train_step = train_step_fn(model, net, x0, t, eps, precision, optimizer, cuda_graph)

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(precision, dev):
            return net(x, t)
    sample_call = graphed_forward(network) if cuda_graph and dev.type == "cuda" else network  # as `diffuse sample`

    @torch.no_grad()
    def forward():
        sample_call(x0, t)

    flops = step_flops(model, net, x0, t, eps, precision)
    if compile and impl == "ours":  # counted above on the plain module; timed below compiled, as `--compile` runs
        net = torch.compile(model)
        train_step = train_step_fn(model, net, x0, t, eps, precision, optimizer, cuda_graph=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    on_gpu = dev.type == "cuda"
    repeats = 3 if preset == "ddpm-cifar10" and not on_gpu else 5
    block = 20 if on_gpu else 1  # a GPU's queue stays full between steps, as in `diffuse train`
    step_s = timed(train_step, repeats=repeats, warmup=WARMUP_STEPS, block=block, sync=sync)
    model.eval()  # as `diffuse sample` runs it: no dropout
    fwd_s = timed(forward, repeats=repeats, warmup=3, block=block, sync=sync)
    peak = (torch.cuda.max_memory_allocated() if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    gflops = flops / step_s / 1e9
    result = {"images_per_s": batch / step_s, "nfe_per_s": 1 / fwd_s, "gflops": gflops,
              "share_of_peak": gflops / practical_peak(precision, dev), "peak_mb": peak / 2**20,
              "params": count_parameters(model)}
    if on_gpu:
        result["share_of_bf16_peak"] = gflops / matmul_peak(dev)
    queue.put(result)


def practical_peak(precision: str, dev: torch.device) -> float:
    """GFLOP/s of a large 3x3 convolution (forward), the best a U-Net layer can hope for."""
    n = 256 if dev.type == "cuda" else 32
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dev, memory_format=torch.channels_last)
    x = torch.randn(n, 256, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        with autocast(precision, dev):
            conv(x)
    block = 10 if dev.type == "cuda" else 1
    return 2 * n * 256 * 256 * 9 * 32 * 32 / timed(run, repeats=10, warmup=2, best=True, block=block,
                                                    sync=synchronizer(dev)) / 1e9


def matmul_peak(dev: torch.device) -> float:
    """GFLOP/s of an 8192x8192x8192 bf16 matrix product: the GPU's practical tensor-core peak."""
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / timed(lambda: a @ b, repeats=10, warmup=3, best=True, block=5, sync=synchronizer(dev)) / 1e9


def in_fresh_process(*args, timeout: float) -> dict:
    """measure(*args) in a new process: its result, or {"failed": why} where the process died without one (out of
    memory, a crash) or ran past `timeout` seconds."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(*args, queue))
    proc.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                code = proc.exitcode
                why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                result = {"failed": why + (" (out of memory?)" if code == -9 else "")}
                break
            if time.monotonic() > deadline:
                proc.kill()
                result = {"failed": f"still running after {timeout:.0f} s (--timeout)"}
                break
    proc.join()
    return result


def paired_ratios(ours: list[dict], theirs: list[dict]) -> tuple[float, float]:
    """Ours over theirs in training images/s and in network calls/s: the median of the rounds' own ratios, each
    round's two runs taken back to back. This machine's speed drifts by 10-20% over tens of seconds, and two runs
    a few seconds apart share it more often than two medians over minutes do."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if "failed" not in a and "failed" not in b]

    def median(values: list[float]) -> float:
        values = sorted(values)
        return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2
    return (median([a["images_per_s"] / b["images_per_s"] for a, b in pairs]),
            median([a["nfe_per_s"] / b["nfe_per_s"] for a, b in pairs]))


def median_run(runs: list[dict]) -> dict:
    """The median of the runs that finished, or the first failure where none did."""
    done = sorted((r for r in runs if "failed" not in r), key=lambda r: r["images_per_s"])
    return done[len(done) // 2] if done else runs[0]


def main() -> None:
    parser = grid_parser(__doc__)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our network (diffusers' stays eager)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure ours and diffusers this many times, in pairs; report each one's median, "
                        "and the median of the pairs' ratios")
    parser.add_argument("--same-runtime", action="store_true",
                        help="diffusers too gets our training step (fused AdamW, CUDA graph, malloc setting): "
                     "compares the networks alone")
    parser.add_argument("--image-size", type=int, default=32, help="the images' side (presets scale to it)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="on a GPU, time our step eagerly, as "
                        "`diffuse train --no-cuda-graph` runs it")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one measurement may take")
    args = parse_grid(parser)

    print(machine_line(args.device) + f", {args.image_size}x{args.image_size} images; diffusers runs "
          + ("with our training step" if args.same_runtime else "as shipped")
          + ("; ours without CUDA graphs" if args.no_cuda_graph else ""), flush=True)
    on_gpu = torch.device(args.device).type == "cuda"
    if not on_gpu and "bf16" in args.precisions and not cpu_kernels().bf16:
        print("note: this CPU's kernels have no native bf16: torch emulates it, so bf16 rows run ~5x slower than fp32")
    header = (f"{'preset':<13}{'batch':>6}{'prec':>6} | {'ours img/s':>10}{'GFLOP/s':>9}{'% peak':>8}"
              + (f"{'% bf16':>8}" if on_gpu else "") + f"{'NFE/s':>8}"
              f"{'peak MB':>9} | {'diffusers':>10}{'% peak':>8}{'NFE/s':>8}{'ours/theirs':>12}")
    print(header + "\n" + "-" * len(header), flush=True)
    baseline: dict[tuple, float] = {}
    ours = None
    for preset in args.presets:
        for batch in args.batches:
            for precision in args.precisions:
                runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
                for r in range(args.rounds):  # each round's pair back to back, each tool first in turn
                    for impl in ("ours", "diffusers")[::-1 if r % 2 else 1]:
                        if impl == "ours":
                            runs["ours"].append(in_fresh_process("ours", preset, batch, precision, args.device,
                                                                 args.compile, True, not args.no_cuda_graph,
                                                                 args.image_size, timeout=args.timeout))
                        elif not args.no_diffusers:
                            runs["diffusers"].append(in_fresh_process(
                                "diffusers", preset, batch, precision, args.device, False, args.same_runtime,
                                args.same_runtime and not args.no_cuda_graph, args.image_size, timeout=args.timeout))
                row = f"{preset:<13}{batch:>6}{precision:>6} | "
                mine = median_run(runs["ours"])
                if "failed" in mine:
                    print(row + f"ours failed: {mine['failed']}", flush=True)
                    continue
                ours = mine
                line = (row + f"{ours['images_per_s']:>10.2f}{ours['gflops']:>9.0f}"
                        f"{100 * ours['share_of_peak']:>7.0f}%"
                        + (f"{100 * ours['share_of_bf16_peak']:>7.1f}%" if on_gpu else "")
                        + f"{ours['nfe_per_s']:>8.2f}{ours['peak_mb']:>9.0f} | ")
                if not args.no_diffusers:
                    theirs = median_run(runs["diffusers"])
                    if "failed" in theirs:
                        line += f"diffusers failed: {theirs['failed']}"
                    else:
                        baseline[(preset, batch, precision)] = theirs["images_per_s"]
                        train, nfe = paired_ratios(runs["ours"], runs["diffusers"])
                        line += (f"{theirs['images_per_s']:>10.2f}{100 * theirs['share_of_peak']:>7.0f}%"
                                 f"{theirs['nfe_per_s']:>8.2f}{train:>11.2f}x  NFE/s {nfe:.2f}x")
                print(line, flush=True)
                if precision == "bf16" and (preset, batch, "fp32") in baseline:
                    print(f"{'':<25} | ours bf16 / diffusers fp32: "
                          f"{ours['images_per_s'] / baseline[(preset, batch, 'fp32')]:.2f}x", flush=True)
    if ours is None:
        return
    print(f"parameters: ours {ours['params']:,} (last row)"
          + ("; '% bf16': share of the GPU's bf16 matrix-product peak" if on_gpu else ""))


if __name__ == "__main__":
    main()
