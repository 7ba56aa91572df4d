"""The CPU thread count follows the cores other programs leave free (threads.py), read from what the machine
reports; injected here, so that these tests mean the same on an idle machine and a busy one. No timing."""

from __future__ import annotations

import time

import pytest
import torch

from diffuse_cli.network import threads
from diffuse_cli.network.threads import INTERVAL, Reading, ThreadShare, read_machine, threads_for, usable_cores


@pytest.mark.parametrize("cores, others, expected", [
    (2, 0.0, 2), (2, 0.05, 2), (2, 0.3, 2),  # idle, background noise, a light neighbour: every core
    (2, 0.5, 1), (2, 0.67, 1), (2, 1.0, 1), (2, 1.33, 1), (2, 2.0, 1),  # one busy thread or more: one thread, never 0
    (16, 1.0, 15), (16, 2.6, 13), (16, 0.2, 16), (1, 0.9, 1), (4, 9.0, 1)])
def test_threads_are_the_cores_others_leave_free(cores, others, expected):
    assert threads_for(cores, others) == expected


class Machine:
    """A machine whose CPU accounting the test writes: `others` cores busy with other programs, and this process
    busy on `own` cores, as time (a fake clock) goes on."""

    def __init__(self, others: float, own: float = 1.0):
        self.now, self.busy, self.own_time, self.others, self.own = 100.0, 5000.0, 3.0, others, own

    def clock(self) -> float:
        return self.now

    def read(self) -> Reading:
        return Reading(self.now, self.busy, self.own_time)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy += (self.others + self.own) * seconds
        self.own_time += self.own * seconds


def share_on(machine: Machine, cores: int = 2, **kw) -> tuple[ThreadShare, list[int]]:
    counts: list[int] = []
    return ThreadShare(machine.read, cores, set_threads=counts.append, clock=machine.clock, **kw), counts


def test_the_count_follows_a_neighbour_that_comes_and_goes():
    machine = Machine(others=0.0, own=2.0)
    cpu, counts = share_on(machine)
    assert cpu.threads == 2 and counts == [2]  # before any reading: every core
    cpu.tick()  # the first reading starts the window
    machine.advance(0.2)
    cpu.settle()
    assert cpu.threads == 2 and cpu.others == pytest.approx(0.0)
    assert cpu.reason() == "2 threads: 2 cores, free (checked every 1 s)"

    machine.others, machine.own = 0.67, 1.33  # a busy thread arrives, and the scheduler shares the cores
    machine.advance(INTERVAL / 2)
    assert not cpu.tick() and cpu.threads == 2  # not read again within an interval
    machine.advance(INTERVAL / 2)
    assert cpu.tick() and cpu.threads == 1 and counts[-1] == 1
    assert cpu.reason() == "1 thread of 2 cores: other programs use 0.7 of them (checked every 1 s)"

    machine.others, machine.own = 1.0, 1.0
    machine.advance(INTERVAL)
    assert not cpu.tick() and cpu.threads == 1
    machine.others = 0.02  # it leaves: the cores come back
    machine.advance(INTERVAL)
    assert cpu.tick() and cpu.threads == 2 and counts == [2, 1, 2]


def test_a_fixed_count_is_never_changed():
    machine = Machine(others=2.0)
    cpu, counts = share_on(machine, fixed=3)
    for _ in range(3):
        machine.advance(INTERVAL)
        assert not cpu.tick()
    cpu.settle()
    assert cpu.threads == 3 and counts == [3] and cpu.reason() == "3 threads, as set"


def test_processes_of_one_ddp_run_count_each_other_as_themselves():
    """Two processes with a share of 4 cores each on 8: the sibling's use is not a neighbour's."""
    machine = Machine(others=0.0, own=4.0)
    cpu, _ = share_on(machine, cores=4, processes=2)
    cpu.tick()
    machine.others = 4.0  # the sibling process, as busy as this one
    machine.advance(1.0)
    cpu.tick()
    assert cpu.others == pytest.approx(0.0) and cpu.threads == 4
    machine.others = 4.0 + 2.0  # and another program on 2 cores: each process takes its half of the loss
    machine.advance(1.0)
    cpu.tick()
    assert cpu.others == pytest.approx(1.0) and cpu.threads == 3


def test_without_cpu_accounting_the_count_stays_at_the_cores():
    cpu = ThreadShare(lambda: None, 4, set_threads=lambda n: None)
    cpu.settle()
    assert not cpu.tick() and cpu.threads == 4 and cpu.reason() == "4 threads, one for each of 4 cores"


def test_the_machine_is_read_over_the_cores_this_process_may_use(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 90 9000 9 0 0 0 0 0\n"
                    "cpu0 100 0 10 1000 1 0 0 0 0 0\n"
                    "cpu1 200 5 20 2000 2 3 4 6 0 0\n"
                    "cpu2 600 0 60 6000 6 0 0 0 0 0\n"
                    "intr 12345\nctxt 999\n")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    reading = read_machine(stat)
    assert reading.busy == pytest.approx((110 + 200 + 5 + 20 + 3 + 4 + 6) / 100)  # idle and iowait are free
    assert read_machine(tmp_path / "missing") is None


@pytest.mark.parametrize("layout, expected", [
    ({"cgroup": "0::/job\n", "job/cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 cores of quota -> 2 threads
    ({"cgroup": "0::/job\n", "job/cpu.max": "max 100000\n"}, 8),
    ({"cgroup": "4:cpu,cpuacct:/slurm/7\n", "cpu,cpuacct/slurm/7/cpu.cfs_quota_us": "300000\n",
      "cpu,cpuacct/slurm/7/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ({"cgroup": "4:cpu,cpuacct:/\n", "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 8),
    ({}, 8)])
def test_usable_cores_are_the_affinity_less_a_cgroup_quota(tmp_path, monkeypatch, layout, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    for name, text in layout.items():
        path = proc / "self" / name if name == "cgroup" else cgroups / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert usable_cores(proc, cgroups) == expected


@pytest.fixture
def fresh_share(monkeypatch):
    """threads' process-wide state as new, and torch's thread count as it was, after the test."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_share", None)
    monkeypatch.setattr(threads, "_fixed", None)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("env, fixed", [({}, None), ({"OMP_NUM_THREADS": "3"}, 3),
                                        ({"OMP_NUM_THREADS": "3", threads.SHARE_ENV: "3"}, None)])
def test_omp_num_threads_fixes_the_count_unless_a_launcher_set_it_as_a_share(monkeypatch, fresh_share, env, fixed):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.SHARE_ENV, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    cpu = threads.share()
    assert cpu.fixed == fixed and cpu.threads == (fixed or cpu.cores) == torch.get_num_threads()
    if threads.SHARE_ENV in env:
        assert cpu.cores == 3
    threads.set_threads(1)  # the API's and --threads' choice wins over the environment
    assert threads.share().fixed == 1 and torch.get_num_threads() == 1


def test_train_says_how_many_threads_and_why(run_cli, tmp_path, monkeypatch, fresh_share):
    """The start summary names the count the free cores decided, and --threads pins it (CPU, fp32)."""
    start = time.monotonic()

    def one_busy_core() -> Reading:  # this process's own time, and another program's busy core
        now, own = time.monotonic(), time.process_time()
        return Reading(now, 5000 + 1.0 * (now - start) + own, own)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "read_machine", one_busy_core)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    args = ["train", "--model", "tiny", "--image-size", "8", "--steps", "2", "--batch-size", "4", "--device", "cpu",
            "--precision", "fp32"]
    result = run_cli(*args, "--out", tmp_path / "auto")
    assert result.code == 0, result
    said = " ".join(result.err.split())  # as one line, however the console wrapped it
    assert "effective batch 4, 1 CPU thread " in said
    assert "threads 1 thread of 2 cores: other programs use 1.0 of them (checked every 1 s) --threads" in said
    result = run_cli(*args, "--out", tmp_path / "fixed", "--threads", "2")
    said = " ".join(result.err.split())
    assert result.code == 0 and "effective batch 4, 2 CPU threads " in said and "threads 2" not in said, result
    assert "--threads must be at least 1" in run_cli(*args, "--threads", "0").err


def test_a_sampling_batch_split_between_workers_draws_the_same_images(monkeypatch, fresh_share):
    """Where the count follows the machine, each CPU batch is drawn as two halves at once, one thread each: the
    same images to rounding as one batch on the calling thread, and the progress counts each call once (fp32)."""
    from diffuse_cli.presets import make_config
    from diffuse_cli.diffusion.denoiser import SampleHooks, generate
    from diffuse_cli.network.unet import UNet

    config = make_config("tiny", image_size=8)
    torch.manual_seed(0)
    net = UNet(config.model).eval()
    seen = []
    threads.set_threads(1)
    whole, calls = generate(net, config, 6, sampler="ddim", steps=4, batch_size=6, seed=3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "read_machine", lambda: None)
    threads.set_threads(None)
    assert threads.worker_parts(6) == 2 and threads.worker_parts(1) == 1
    halves, calls_split = generate(net, config, 6, sampler="ddim", steps=4, batch_size=6, seed=3,
                                   hooks=SampleHooks(progress=lambda done, total: seen.append((done, total))))
    assert calls_split == calls == 4 and seen[-1] == (pytest.approx(4.0), 4) and len(seen) == 8
    assert (halves.int() - whole.int()).abs().max() <= 1 and (halves == whole).float().mean() > 0.99
    assert threads.split(7, 2) == [(0, 4), (4, 7)] and threads.split(2, 2) == [(0, 1), (1, 2)]
