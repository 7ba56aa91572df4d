"""What data parallelism costs: one process with and without the DDP wrapper, and N against 1.

    python benchmarks/ddp.py                      # CPU, gloo; small preset, batch 32
    python benchmarks/ddp.py --device cuda        # on a GPU machine (NCCL)

Part 1 times the same training step (ours: forward, backward, clip, AdamW) on a bare module and
on the module wrapped in DistributedDataParallel in a one-process group, so the difference is
the wrapper's own cost (bucketing, the all-reduce hooks). Part 2 runs `diffuse train`'s loop
in 1 and in N processes (global batch fixed) and compares images/s; on a 2-core CPU N
processes share the same two cores, so expect no speed-up there: it checks the overhead.
Part 3 times loading a folder of JPEGs (full-size decodes at --image-size 256) in one process,
in N processes that each decode every file, and in N processes that decode a share each and
swap the results over gloo, as `diffuse train` does.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from common import synchronizer, timed, train_step_fn  # noqa: E402

from diffuse_cli.config import Config, TrainConfig  # noqa: E402
from diffuse_cli.presets import model_config  # noqa: E402
from data_loading import write_jpegs  # noqa: E402

from diffuse_cli.training import distributed  # noqa: E402
from diffuse_cli.images.data import load_builtin, load_folder  # noqa: E402
from diffuse_cli.network.device import memory_format, resolve_precision  # noqa: E402
from diffuse_cli.training.loop import Options, train  # noqa: E402
from diffuse_cli.network.unet import UNet  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrapper_cost(device: str, batch: int) -> None:
    dev = torch.device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    precision = resolve_precision("auto", dev)
    x0 = torch.rand(batch, 3, 32, 32, device=dev).contiguous(memory_format=memory_format(dev, precision))
    eps, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,), device=dev)
    rates = {False: 0.0, True: 0.0}
    for wrapped in (False, True, False, True):  # interleaved, best of two: warm-up and drift cancel
        torch.manual_seed(0)
        model = UNet(model_config("small")).to(dev, memory_format=memory_format(dev, precision))
        net = DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda" else None) if wrapped else model
        step = train_step_fn(model, net, x0, t, eps, precision)
        rates[wrapped] = max(rates[wrapped], batch / timed(step, repeats=5, warmup=2, block=10 if dev.type == "cuda" else 1,
                                                                      sync=synchronizer(dev)))
    dist.destroy_process_group()
    print(f"one process, small preset, batch {batch}, {precision} on {device}: "
          f"bare {rates[False]:.1f} img/s, DDP-wrapped {rates[True]:.1f} img/s, "
          f"overhead {100 * (1 - rates[True] / rates[False]):.1f}%")


CONFIG = Config(preset="small", model=model_config("small"), train=TrainConfig(batch_size=32, steps=40, warmup=1))


def run_rank(rank: int, world: int, port: int, run_dir: str, device: str, queue) -> None:
    """One process of an N-process run (or the whole run when world = 1: no process group)."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    result = train(CONFIG, load_builtin(32, n=2048), run_dir, Options(device=torch.device(device),
                   save_every=10**6, sample_every=10**6))
    if rank == 0:
        late = [r["images_per_s"] for r in result.records[1:]]  # skip the first (warm-up) interval
        queue.put(sum(late) / len(late))


def in_processes(target, world: int, *args) -> float:
    """Run target(rank, world, port, *args, queue) in `world` spawned processes; what rank 0 puts."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    value = queue.get()
    for p in procs:
        p.join()
    return value


def processes(world: int, device: str, tmp: str) -> float:
    """Images/s of `diffuse train`'s loop in `world` processes."""
    return in_processes(run_rank, world, f"{tmp}/w{world}", device)


def load_rank(rank: int, world: int, port: int, folder: str, shared: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    share = distributed.share(torch.device("cpu"))
    dist.barrier(share.group)
    start = time.perf_counter()
    load_folder(folder, 256, share=share if shared else None)
    dist.barrier(share.group)
    if rank == 0:
        queue.put(time.perf_counter() - start)
    dist.destroy_process_group()


def loading(world: int, folder: str, shared: bool) -> float:
    """Seconds until every one of `world` processes holds the decoded folder."""
    return in_processes(load_rank, world, folder, shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tmp", default="checkpoints/ddp-bench")
    parser.add_argument("--load-images", type=int, default=2000, help="JPEGs for part 3 (0: skip it)")
    args = parser.parse_args()
    wrapper_cost(args.device, 32)
    if args.device == "cpu" or torch.cuda.device_count() >= args.processes:
        one = processes(1, args.device, args.tmp)
        many = processes(args.processes, args.device, args.tmp)
        print(f"diffuse train loop, global batch 32: 1 process {one:.1f} img/s, {args.processes} processes "
              f"{many:.1f} img/s ({many / one:.2f}x)")
    if args.load_images:
        with tempfile.TemporaryDirectory() as folder:
            write_jpegs(Path(folder), args.load_images)
            start = time.perf_counter()
            load_folder(folder, 256)
            one = time.perf_counter() - start
            each, shared = loading(args.processes, folder, False), loading(args.processes, folder, True)
        print(f"loading {args.load_images} 512x384 JPEGs at 256x256: 1 process {one:.1f} s; {args.processes} processes "
              f"each decoding every file {each:.1f} s, sharing the decoding {shared:.1f} s")


if __name__ == "__main__":
    main()
