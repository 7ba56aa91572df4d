"""Running numba's compiled CPU kernels (winograd_kernels.py, norm_kernels.py) beside torch.

numba compiles each kernel on its first call and keeps it in its own on-disk cache, so a later process loads it in
a fraction of a second. The kernels run in numba's threads, as many as torch is using at the moment of the call
(network/threads.py may have lowered torch's for a busy machine). Where numba is missing, or cannot load for this
numpy, `kernels()` is None and the callers take their torch form.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from types import ModuleType

import torch


@functools.cache
def kernels(name: str) -> ModuleType | None:
    """The kernel module diffuse_cli.network.<name>, or None where numba cannot load."""
    _cap_to_torchs()
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


@functools.cache
def _cap_to_torchs() -> None:
    """Where torch's CPU kernels were held below this machine's instructions (device.compiled_cpu), numba compiles
    ours for the same (its on-disk cache keeps each CPU's code apart), unless NUMBA_CPU_NAME already says what."""
    from .device import compiled_cpu

    if (cpu := compiled_cpu()) is None or "NUMBA_CPU_NAME" in os.environ:
        return
    os.environ["NUMBA_CPU_NAME"], os.environ["NUMBA_CPU_FEATURES"] = cpu, ""  # read when numba loads
    if "numba" in sys.modules:  # loaded already (by the caller's own code): its settings are told directly
        from numba.core import config

        config.CPU_NAME, config.CPU_FEATURES = cpu, ""


def run(kernel, *arrays) -> None:
    """kernel(*arrays) on torch's current number of threads. numba shares torch's OpenMP runtime, and starting its
    threads resets that runtime's count: torch's is put back. numba's count is its calling thread's own, and is set
    only when torch's has changed since that thread's last kernel (a network call runs dozens)."""
    threads = torch.get_num_threads()
    if getattr(_numba_threads, "count", None) != threads:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        _numba_threads.count = threads
    kernel(*arrays)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_numba_threads = threading.local()  # .count: torch's thread count when this thread last set numba's


def numpy(x: torch.Tensor):
    """x's memory as a numpy array (copied only if x is not contiguous), outside autograd."""
    return x.detach().contiguous().numpy()


def nhwc(x: torch.Tensor):
    """An image batch (N, C, H, W) as the (N, H, W, C) numpy array of its channels_last memory (a copy if it is not)."""
    return numpy(x.permute(0, 2, 3, 1))
