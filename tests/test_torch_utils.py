"""utils/torch_utils.py: reuse_freed_memory (glibc's malloc keeps large freed blocks instead of re-mapping them)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter (the setting is process-wide): page faults of allocating and filling a 48 MB tensor, above
# glibc's largest mmap threshold (32 MiB), repeatedly, before and after reuse_freed_memory. After it, the heap takes a
# few allocations to settle (the first one or two may land at a new top and fault), then the block is reused: the
# median of five after three warm-ups.
FAULTS = """
import resource, statistics, torch
from utils.torch_utils import reuse_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(12_000_000)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
def median_faults():
    [faults() for _ in range(3)]
    return statistics.median(faults() for _ in range(5))
before = median_faults()
applied = reuse_freed_memory()
print(applied, before, median_faults())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="reuse_freed_memory acts on glibc only"
)
def test_reuse_freed_memory_stops_refaulting_a_large_tensor_each_time():
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, check=True)
    applied, before, after = out.stdout.split()
    pages = 48e6 / 4096
    assert applied == "True"
    assert float(before) > 0.9 * pages  # default glibc: every page of the block faults in again
    assert float(after) < 0.01 * pages  # reused: the block's pages are already mapped
