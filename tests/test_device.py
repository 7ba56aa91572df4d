import os

import pytest
import torch

from diffuse_cli.errors import UsageError
from diffuse_cli.network.device import DEVICE_ENV, memory_available, pick_device

from .conftest import assert_clean_error


def test_memory_available_heeds_cgroup_limits_of_the_process_and_its_parents(tmp_path):
    def files(root, **contents):
        for name, text in contents.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
    proc, v2, v1 = tmp_path / "proc", tmp_path / "v2", tmp_path / "v1"
    files(proc, meminfo="MemTotal:  64 kB\nMemFree:  2 kB\nMemAvailable:  10 kB\n")
    assert memory_available(proc, v2) == 10 * 1024  # no cgroup file: the kernel's MemAvailable

    files(proc, **{"self/cgroup": "0::/job/step\n"})
    files(v2, **{"job/memory.max": "5000\n", "job/memory.current": "1200\n",
                 "job/step/memory.max": "max\n", "job/step/memory.current": "1000\n"})
    assert memory_available(proc, v2) == 3800  # the job's limit binds, not the step's "max"

    files(proc, **{"self/cgroup": "5:cpu:/x\n4:memory:/a\n0::/\ngarbage\n"})
    files(v1, **{"memory/a/memory.limit_in_bytes": "9223372036854771712", "memory/a/memory.usage_in_bytes": "9",
                 "memory/memory.limit_in_bytes": "20000", "memory/memory.usage_in_bytes": "1000"})
    assert memory_available(proc, v1) == 10 * 1024  # v1: the root's 19,000 left is more than MemAvailable
    files(v1, **{"memory/a/memory.limit_in_bytes": "3000"})
    assert memory_available(proc, v1) == 2991


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    """A T4 (7.5) or V100 (7.0) answers torch.cuda.is_bf16_supported() with True, since it can emulate
    bf16, slowly: 'auto' must give it fp16 (with the gradient scaler) and Ampere on bf16."""
    import torch

    from diffuse_cli.network.device import resolve_precision

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"  # asked for by name, it is what you get


def test_auto_is_the_device_diffuse_device_names_and_a_name_given_wins(monkeypatch):
    """On a machine with a GPU (pretended here), $DIFFUSE_DEVICE=cpu keeps 'auto' off it; a device asked for by
    name is what you get; unset, 'auto' takes the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == pick_device("auto") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.delenv(DEVICE_ENV)
    assert pick_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("value, words", [("gpu", "unknown device DIFFUSE_DEVICE='gpu'"),
                                          ("cuda:0", "DIFFUSE_DEVICE='cuda:0' asked for, but CUDA is not available")])
def test_a_bad_diffuse_device_is_one_line_naming_it(run_cli, monkeypatch, tmp_path, value, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        pick_device()
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "--steps", "1")
    assert result.code == 2 and words in result.err, result
    assert_clean_error(result)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("kernels, precision, layout", [
    (("AVX512", "ALL", True), "bf16", torch.contiguous_format),  # AMX or AVX-512 BF16, all allowed
    (("AVX2", "ALL", False), "fp32", torch.channels_last),       # a laptop
    (("AVX512", "AVX2", False), "fp32", torch.channels_last),    # an AMX machine with oneDNN held to AVX2
    (("DEFAULT", "ALL", False), "fp32", torch.channels_last)])
def test_auto_precision_and_layout_on_the_cpu_follow_the_kernels_torch_runs(monkeypatch, kernels, precision, layout):
    from diffuse_cli.network import device

    monkeypatch.setattr(device, "cpu_kernels", lambda: device.CpuKernels(*kernels))
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == precision
    assert device.memory_format(cpu, device.resolve_precision("auto", cpu)) == layout
    assert ("natively" in device.precision_reason(precision, cpu)) == (precision == "bf16")


def test_cpu_kernels_are_what_torch_and_onednn_were_told(tmp_path):
    """ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, as set before torch loads (the emulation benchmarks/common.py's
    --isa starts): torch's capability, no native bf16, and so fp32 for 'auto', on any x86 CPU."""
    import subprocess
    import sys

    probe = ("import torch; from diffuse_cli.network import device; k = device.cpu_kernels(); "
             "print(k.capability, k.onednn_max, k.bf16, device.resolve_precision('auto', torch.device('cpu')))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DEFAULT", "AVX2", "False", "fp32"]


@pytest.mark.parametrize("capability, flags, cpu", [
    ("AVX2", {"avx2", "avx512f"}, "haswell"),  # an AVX-512 machine run as AVX2 (benchmarks' --isa avx2)
    ("AVX2", {"avx2"}, None),                   # a laptop: numba compiles for it as it is
    ("DEFAULT", {"sse2", "avx2"}, "x86-64"),
    ("AVX512", {"avx2", "avx512f"}, None)])
def test_our_compiled_kernels_are_held_to_the_instructions_torchs_were(monkeypatch, capability, flags, cpu):
    from diffuse_cli.network import device

    monkeypatch.setattr(device, "cpu_kernels", lambda: device.CpuKernels(capability, "ALL", False))
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset(flags))
    assert device.compiled_cpu.__wrapped__() == cpu


def test_numba_is_told_the_capped_cpu_before_it_compiles(tmp_path):
    """In a process started as benchmarks' --isa default starts one, numba compiles our kernels for x86-64 on any
    x86 CPU with AVX2 (ATen's kernels there are its baseline's), and for this CPU where torch's are not capped."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    probe = ("from diffuse_cli.network import compiled; compiled.kernels('norm_kernels'); import numba; "
             "print(numba.config.CPU_NAME)")
    has_avx2 = "avx2" in open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else False
    for env, wanted in (({"ATEN_CPU_CAPABILITY": "default"}, "x86-64" if has_avx2 else "None"), ({}, "None")):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU", "ATEN_CPU"))}
        out = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
                             check=True).stdout
        assert out.split()[-1] == wanted
