import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from diffuse_cli.device import keep_cpu_memory
def faults_of_fourth_use(nbytes):
    for _ in range(4):  # allocate, touch every page, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults_of_fourth_use(16 * 2**20)
print(keep_cpu_memory(), default, faults_of_fourth_use(16 * 2**20))
"""

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_cpu_memory_stops_refaulting_freed_blocks():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    applied, default, kept = out[0] == "True", int(out[1]), int(out[2])
    pages = 16 * 2**20 // 4096
    assert applied
    if default < pages // 2:
        pytest.skip("this malloc already reuses freed 16 MiB blocks; nothing to tell apart")
    assert kept < pages // 20    # kept, later uses find their pages already there
