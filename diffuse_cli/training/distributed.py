"""Data parallelism through torch.distributed, as launched by torchrun (env:// rendezvous)."""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # the processes on this machine
    host: object = None  # the gloo group for agreeing on host values (None: the default group, gloo itself)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_s: float = 600) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); one process otherwise."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _host_group())


@functools.cache
def _host_group() -> object:
    """One gloo group over every process, made once per process (a collective call: every rank makes it at
    the same point, in init). All-reducing a CPU tensor over it never waits for a GPU's queue to drain."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def device_for(device: torch.device, world: World) -> torch.device:
    """Each process on its own GPU (its local rank); CPU processes share the CPU."""
    if device.type == "cuda" and world.size > 1:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def agree(flag: bool, seconds: float, world: World) -> tuple[bool, float]:
    """(any rank's flag, the largest of the ranks' seconds), the same on every rank: asked before every step
    (stop? and how far into the time budget, on which the learning rate may depend), agreed on the host."""
    if world.size == 1:
        return flag, seconds
    t = torch.tensor([float(flag), seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.host)
    return bool(t[0].item()), float(t[1].item())


def smallest(value: int, world: World) -> int:
    """The smallest of every rank's value, on every rank (agreed on the host)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=world.host)
    return int(t.item())


@dataclass(frozen=True)
class Share:
    """The processes of a run, swapping CPU tensors over gloo whatever backend trains (data loading)."""

    rank: int
    size: int
    group: object

    def all(self, flag: bool) -> bool:
        """True on every process if flag is true on all of them."""
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def same(self, value: int) -> bool:
        """True on every process if every process passed the same value."""
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0]) == value == -int(t[1])

    def sum_(self, t: torch.Tensor, chunk_bytes: int = 1 << 28) -> None:
        """Sum a contiguous tensor over the processes in place, in slices of at most chunk_bytes."""
        flat, step = t.view(-1), max(1, chunk_bytes // t.element_size())
        for start in range(0, flat.numel(), step):
            dist.all_reduce(flat[start:start + step], group=self.group)

    def merge(self, texts: dict[int, str]) -> dict[int, str]:
        """Every process's dict in one, sent as JSON."""
        payload = torch.frombuffer(bytearray(json.dumps(texts).encode()), dtype=torch.uint8)
        longest = torch.tensor([len(payload)])
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
        padded = torch.zeros(int(longest), dtype=torch.uint8)
        padded[:len(payload)] = payload
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        merged: dict[int, str] = {}
        for part in parts:  # JSON never holds a NUL byte: the padding is all that is stripped
            merged.update((int(k), v) for k, v in json.loads(part.numpy().tobytes().rstrip(b"\0")).items())
        return merged


def share(device: torch.device) -> Share | None:
    """Join the process group (as `init`), for data loading over its gloo group; None alone."""
    world = init(device)
    if world.size == 1:
        return None
    return Share(world.rank, world.size, world.host)
