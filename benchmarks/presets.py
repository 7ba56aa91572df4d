"""The presets at the sizes users ask for: parameters, training speed, peak memory, and the estimate against it.

For each preset and image size, in a fresh process (so that the peak is its own): the network the preset is
shaped into at that size (config.network_shape), its parameter count, images/s of `diffuse train`'s own step
(forward, backward, clip, AdamW, EMA) after warm-up, the step's peak memory (on a GPU, the allocator's peak; on
the CPU, the process's peak resident memory less what it held before the model was built), and
training/memory.py's estimate of that peak, made before the first step, as `diffuse train` makes it.

    python benchmarks/presets.py                                  # tiny..large at 32, 64, 128, 256 (about 25 min here)
    python benchmarks/presets.py --presets small --sizes 64 --batch 16
    python benchmarks/presets.py --checkpointing                  # the same with --checkpointing
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import synchronizer, timed, train_step_fn  # noqa: E402


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(preset: str, size: int, batch: int, precision: str, device: str, checkpointing: bool, queue) -> None:
    from diffuse_cli.config import Config
    from diffuse_cli.presets import model_config
    from diffuse_cli.network.device import memory_format
    from diffuse_cli.network.fast_ops import keep_cpu_memory
    from diffuse_cli.network.unet import UNet, count_parameters
    from diffuse_cli.training.memory import step_memory

    dev = torch.device(device)
    if dev.type == "cpu":
        keep_cpu_memory()
    torch.manual_seed(0)
    tiny = UNet(model_config("tiny", image_size=8)).to(dev)  # the runtime's start-up memory is not the step's:
    x = torch.zeros(2, 3, 8, 8, device=dev)                 # one step of a tiny network first
    train_step_fn(tiny, tiny, x, torch.zeros(2, dtype=torch.long, device=dev), x, precision, cuda_graph=False)()
    del tiny
    before = peak_rss()
    config = Config(preset=preset, model=model_config(preset, image_size=size))
    model = UNet(config.model).to(dev, memory_format=memory_format(dev, precision))
    model.checkpointing = checkpointing
    fmt = memory_format(dev, precision)
    x0 = torch.rand(batch, 3, size, size, device=dev).mul(2).sub(1).contiguous(memory_format=fmt)
    eps, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,), device=dev)
    step = train_step_fn(model, model, x0, t, eps, precision, cuda_graph=not checkpointing)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, repeats=2 if size >= 128 else 3, warmup=2, sync=synchronizer(dev))
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss() - before
    estimate = step_memory(model, config, precision, checkpointing).need(batch)  # after: its forwards add no peak
    queue.put({"params": count_parameters(model), "images_per_s": batch / seconds, "peak": peak,
               "estimate": estimate, "levels": len(config.model.channel_mult),
               "attention": config.model.attention_resolutions})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base", "large"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"batch {args.batch}, {args.precision} on {args.device}" + (", --checkpointing" * args.checkpointing))
    print(f"{'preset':<7}{'size':>5}{'levels':>7}  {'attention':<12}{'params':>9}{'img/s':>9}{'peak MB':>9}"
          f"{'estimate':>10}{'error':>8}")
    for preset in args.presets:
        for size in args.sizes:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(preset, size, args.batch, args.precision, args.device,
                                                     args.checkpointing, queue))
            proc.start()
            r = queue.get()
            proc.join()
            error = r["estimate"] / r["peak"] - 1
            print(f"{preset:<7}{size:>5}{r['levels']:>7}  {','.join(map(str, r['attention'])) or '-':<12}"
                  f"{r['params'] / 1e6:>8.2f}M{r['images_per_s']:>9.1f}{r['peak'] / 2**20:>9.0f}"
                  f"{r['estimate'] / 2**20:>10.0f}{error:>+8.0%}", flush=True)


if __name__ == "__main__":
    main()
