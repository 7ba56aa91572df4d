"""How many threads torch's CPU operations use: the cores that other programs leave free.

torch runs each operation as a parallel region over its intra-op threads, and every region ends at a
barrier. Where another program holds a core, the thread the scheduler put behind it reaches each barrier
a time slice late, at every one of a training step's thousands of small operations, so that two threads
beside one busy thread run at a small fraction of one thread's speed (docs/speed.md has the figures). So
the count is the cores others leave free: the busy time of this process's cores, from the kernel's
accounting, less this process's own, read again every INTERVAL seconds as the work goes on, since
neighbours come and go. Results depend on the count only through floating-point rounding; a fixed count
(`--threads N`, set_threads, or OMP_NUM_THREADS) makes a run repeat bit for bit.

Under DDP on the CPU the launcher gives each process its share of the cores (SHARE_ENV); a process counts
the other processes of its run as itself, and takes its part of what the rest of the machine leaves.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Others' use of a core below which running a thread on it still pays: beside a neighbour busy for this share of
# the time (a 20 ms duty cycle), one thread and two trained at the same speed on 2 cores; above it, one is faster.
SLACK = 0.35
INTERVAL = 1.0  # seconds between readings
FIRST_WINDOW = 0.1  # the shortest reading that decides (10 clock ticks a core)
SHARE_ENV = "DIFFUSE_CPU_SHARE"  # the cores a DDP launcher gave each process (launch.py)


@dataclass(frozen=True)
class Reading:
    """The machine's CPU accounting at one moment, in seconds."""

    wall: float   # time.monotonic()
    busy: float   # CPU time every program has spent on this process's cores
    own: float    # CPU time this process has spent, all its threads


def read_machine(stat: Path = Path("/proc/stat")) -> Reading | None:
    """Now's Reading from /proc/stat (Linux), over the cores this process may run on; None elsewhere."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    tick, busy = os.sysconf("SC_CLK_TCK"), 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (allowed is not None and int(name[3:]) not in allowed):
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        busy += user + nice + system + irq + softirq + steal  # steal: a hypervisor gave the core to someone else
    return Reading(time.monotonic(), busy / tick, time.process_time())


def usable_cores(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, less where a cgroup's CPU quota (a container, a Slurm
    job) allows fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(proc, cgroups)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cgroup_cpu_quota(proc: Path, cgroups: Path) -> float | None:
    """Cores' worth of CPU time per second that this process's cgroup allows (v2 cpu.max, v1 CFS quota); None: no limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        try:
            if controllers == "":
                quota, period = (cgroups / path.lstrip("/") / "cpu.max").read_text().split()[:2]
            elif "cpu" in controllers.split(","):
                folder = cgroups / controllers / path.lstrip("/")
                quota, period = ((folder / f"cpu.cfs_{name}_us").read_text().strip() for name in ("quota", "period"))
            else:
                continue
            if quota not in ("max", "-1"):
                return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


def threads_for(cores: int, others: float) -> int:
    """Threads to run on `cores` cores beside other programs using `others` cores' worth of CPU time."""
    return max(1, min(cores, cores - math.ceil(others - SLACK)))


class ThreadShare:
    """Keeps torch's intra-op thread count at threads_for(the cores, what other programs use), or at a fixed count.

    Call tick() often (once a training step, once a network call) from the thread that runs the work, since a
    parallel region takes its size from the thread that starts it: once an INTERVAL it reads the machine, and
    changes the count when the cores left free change."""

    def __init__(self, read: Callable[[], Reading | None] | None = None, cores: int | None = None,
                 processes: int = 1, fixed: int | None = None, set_threads: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.monotonic):
        self.read, self.cores = read or read_machine, cores or usable_cores()
        self.processes, self.fixed = processes, fixed
        self.set_threads, self.clock = set_threads, clock
        self.threads = fixed or self.cores
        self.others: float | None = None  # cores' worth of other programs' CPU time at the last reading
        self.last: Reading | None = None
        self.set_threads(self.threads)

    def tick(self) -> bool:
        """Read the machine if an INTERVAL has passed, and follow it; True when the count changed."""
        if self.fixed is not None:
            return False
        if self.last is None:
            self.last = self.read()
            return False
        if self.clock() - self.last.wall < (INTERVAL if self.others is not None else FIRST_WINDOW):
            return False
        now = self.read()
        if now is None:
            return False
        wall = max(now.wall - self.last.wall, 1e-9)
        own = (now.own - self.last.own) / wall
        self.others = max(0.0, (now.busy - self.last.busy) / wall - own * self.processes) / self.processes
        self.last = now
        threads = threads_for(self.cores, self.others)
        if threads == self.threads:
            return False
        self.threads = threads
        self.set_threads(threads)
        return True

    def settle(self) -> None:
        """Make the first choice now: read the machine over at least FIRST_WINDOW seconds."""
        if self.fixed is not None or self.others is not None:
            return
        if self.last is None:
            self.last = self.read()
        if self.last is None:
            return
        time.sleep(max(0.0, FIRST_WINDOW - (self.clock() - self.last.wall)))
        self.tick()

    def reason(self) -> str:
        """How many threads, and why, in a few words."""
        plural = "s" * (self.threads != 1)
        if self.fixed is not None:
            return f"{self.threads} thread{plural}, as set"
        share = f"this process's share of {self.cores} cores" if self.processes > 1 else f"{self.cores} cores"
        if self.others is None:
            return f"{self.threads} thread{plural}, one for each of {share}"
        if self.threads == self.cores:
            return f"{self.threads} thread{plural}: {share}, free (checked every {INTERVAL:g} s)"
        return (f"{self.threads} thread{plural} of {share}: other programs use {self.others:.1f} of them "
                f"(checked every {INTERVAL:g} s)")


_share: ThreadShare | None = None
_fixed: int | None = None


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU thread count for what diffuse runs next in this process (None: follow the free cores)."""
    global _share, _fixed
    if threads is not None and threads < 1:
        from ..errors import UsageError

        raise UsageError(f"threads must be at least 1, not {threads}")
    _fixed, _share = threads, None


def share() -> ThreadShare:
    """This process's ThreadShare, made on first use: fixed by set_threads, or by OMP_NUM_THREADS where the
    user set it; else following the free cores (of this process's share of them, under a DDP launcher)."""
    global _share
    if _share is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        launcher_share = os.environ.get(SHARE_ENV, "")
        fixed = _fixed
        if fixed is None and env.isdigit() and int(env) > 0 and not launcher_share:
            fixed = int(env)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launcher_share else 1
        cores = min(int(launcher_share), usable_cores()) if launcher_share.isdigit() and int(launcher_share) > 0 else None
        _share = ThreadShare(cores=cores, processes=processes, fixed=fixed)
    return _share


def tick() -> bool:
    """share().tick(): follow the machine; True when the count changed. Workers (in_workers) keep their count."""
    return threading.current_thread() is threading.main_thread() and share().tick()


# Work that splits into independent parts (a sampling batch: each image from its own seed) runs as WORKERS parts at
# once, each on its own threads: the parts share no barrier, so a neighbour that holds a core delays one part, not
# every operation of all of them (docs/speed.md, "A busy machine").
WORKERS = 2


def worker_parts(count: int) -> int:
    """Into how many parts to split `count` independent items: WORKERS when the count follows the machine and
    there are cores and items for them, else 1 (a fixed count keeps the work on the calling thread)."""
    cpu = share()
    return min(WORKERS, count) if cpu.fixed is None and cpu.cores >= 2 else 1


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `parts` near-equal shares of range(count)."""
    edges = [round(i * count / parts) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def in_workers(work: Callable[..., torch.Tensor], args: list[tuple]) -> torch.Tensor:
    """torch.cat of work(*a) for each a, run at once in len(args) threads, each with its share of the thread count,
    in no-grad mode like the caller (autograd's mode is per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    tick()  # the workers never read the machine (tick is the calling thread's), so it is read here, once a batch
    each = max(1, share().threads // len(args))
    grad = torch.is_grad_enabled()

    def run(a: tuple) -> torch.Tensor:
        torch.set_num_threads(each)  # this thread's own count (OpenMP's is per thread)
        with torch.set_grad_enabled(grad):
            return work(*a)
    with ThreadPoolExecutor(len(args), thread_name_prefix="diffuse-worker") as pool:
        return torch.cat(list(pool.map(run, args)))
