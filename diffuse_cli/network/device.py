"""Where to run, in what precision, and how much host memory this process may take."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Precision
from ..errors import UsageError


# The device 'auto' means where this is set (cpu, cuda, cuda:N or mps): a sampling job kept off the GPU a training run
# holds, or a test suite that states its device (tests/conftest.py)
DEVICE_ENV = "DIFFUSE_DEVICE"


def pick_device(name: str | None = None) -> torch.device:
    """`name` (e.g. 'cpu', 'cuda:1'); None or 'auto': $DIFFUSE_DEVICE where set, else CUDA, then Apple MPS, then CPU."""
    source = ""
    if not name or name == "auto":
        name, source = os.environ.get(DEVICE_ENV, "").strip(), f"{DEVICE_ENV}="
    if not name or name == "auto":
        return _best_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {source}{name!r}; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {source}{name!r} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {source}'mps' asked for, but Apple MPS is not available here")
    return device


def _best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class CpuKernels:
    """The CPU as torch's kernels see it, not as /proc/cpuinfo alone says: ATen's vector instruction set
    (ATEN_CPU_CAPABILITY can lower it), the most oneDNN may use (ONEDNN_MAX_CPU_ISA), and whether bf16 is
    computed natively, which needs all three: the instructions, ATen's AVX-512 kernels and oneDNN's leave."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    onednn_max: str  # ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) as set, upper case; "ALL" where unset
    bf16: bool

    @property
    def avx512(self) -> bool:
        return self.capability.startswith("AVX512")

    def describe(self) -> str:
        """The instruction sets in a few words: 'AVX2', or 'AVX512, oneDNN up to AVX2'."""
        return self.capability + ("" if self.onednn_max == "ALL" else f", oneDNN up to {self.onednn_max}")


# oneDNN's instruction sets that compute bf16 natively (AVX-512 BF16, AMX and what extends them)
_ONEDNN_BF16 = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


@functools.cache
def cpu_kernels() -> CpuKernels:
    """This process's CpuKernels (read once: torch and oneDNN read their variables when they load)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    onednn_max = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    flags = _cpu_flags()
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return CpuKernels(capability, onednn_max, has_bf16 and capability.startswith("AVX512") and onednn_max in _ONEDNN_BF16)


# For ATen's capabilities below AVX-512: LLVM's CPU of that instruction set, and a flag of a machine that has more
_CAPPED_CPUS = {"AVX2": ("haswell", "avx512f"), "DEFAULT": ("x86-64", "avx2")}


@functools.cache
def compiled_cpu() -> str | None:
    """The CPU our numba kernels (compiled.py) are to be compiled for, where torch's kernels were capped below this
    machine's (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU): an LLVM CPU of that capability, so that an emulated
    run's whole step runs the instructions a real such machine has, not only torch's part of it. None: this
    machine's own, numba's default."""
    name, more = _CAPPED_CPUS.get(cpu_kernels().capability, (None, None))
    return name if more in _cpu_flags() else None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (none where it cannot be read)."""
    try:
        return frozenset(open("/proc/cpuinfo").read().split())
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    """True where torch's CPU kernels compute bf16 natively (CpuKernels.bf16)."""
    return cpu_kernels().bf16


def cuda_has_bf16(device: torch.device) -> bool:
    """True where the GPU computes bf16 in hardware: NVIDIA from Ampere on (compute capability 8), or
    ROCm. Older NVIDIA GPUs (T4, V100, RTX 20xx) only emulate it, far slower than fp16, although
    torch.cuda.is_bf16_supported() answers True there (it counts emulation)."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """'auto' -> bf16 where the hardware computes it natively, else fp16 on CUDA, else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UsageError("fp16 is for GPUs; on the CPU use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def precision_reason(precision: Precision, device: torch.device) -> str:
    """Why 'auto' picks this precision on this device, in a few words."""
    if device.type == "cuda":
        return "this GPU computes bf16" if precision == "bf16" else "this GPU only emulates bf16, so fp16 with loss scaling"
    if device.type == "cpu":
        if precision == "bf16":
            return "this CPU computes bf16 natively"
        return f"torch's kernels here ({cpu_kernels().describe()}) have no native bf16"
    return f"the choice for {device.type}"


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device, precision: Precision) -> torch.memory_format:
    """channels_last on GPUs, whose tensor-core convolutions want it, and on the CPU in fp32, where its convolutions
    are faster so (oneDNN's on AVX-512; on AVX2 the Winograd ones too, fast_ops.conv3x3); contiguous for the CPU's
    bf16 convolutions, faster that way, and on Apple MPS (benchmarks/train_speed.py measures both; docs/speed.md)."""
    if device.type == "cuda" or (device.type == "cpu" and precision == "fp32"):
        return torch.channels_last
    return torch.contiguous_format


def layout_of(model: torch.nn.Module) -> torch.memory_format:
    """The memory format of a model's convolution weights, for inputs to match."""
    weight = next((p for p in model.parameters() if p.ndim == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def memory_available(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory this process can still take: the kernel's MemAvailable (free memory and
    the page cache it can drop), less where a cgroup limit (a container, a Slurm job) leaves less."""
    try:
        meminfo = dict(line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
    left = _cgroup_memory_left(proc, cgroups)
    return available if left is None else min(available, left)


def device_memory_available(device: torch.device) -> int:
    """Bytes a run may still take on `device`: on a GPU what CUDA reports free plus what torch's allocator holds
    unused; elsewhere the host's memory_available()."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return memory_available()


def _cgroup_memory_left(proc: Path, cgroups: Path) -> int | None:
    """Least of limit less usage over this process's memory cgroup and its parents (v2 or v1);
    None when none of them has a limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # not "id:controllers:path"
            continue
        _, controllers, path = fields
        if controllers == "":
            mount, files = cgroups, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            mount, files = cgroups / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        own = mount / path.lstrip("/")
        for folder in (own, *own.parents[:len(own.parents) - len(mount.parents)]):  # up to the mount
            try:
                limit, usage = ((folder / name).read_text().strip() for name in files)
                if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as about 2^63
                    left.append(max(0, int(limit) - int(usage)))
            except (OSError, ValueError):
                continue
    return min(left) if left else None
