"""utils/torch_utils.py: reuse_freed_memory (glibc's malloc keeps large freed blocks instead of re-mapping them)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter (the setting is process-wide): page faults of allocating and filling a 48 MB tensor, above
# glibc's largest mmap threshold (32 MiB), the second time, before and after reuse_freed_memory.
FAULTS = """
import resource, torch
from utils.torch_utils import reuse_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(12_000_000)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults()
before = faults()
applied = reuse_freed_memory()
faults()
print(applied, before, faults())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="reuse_freed_memory acts on glibc only"
)
def test_reuse_freed_memory_stops_refaulting_a_large_tensor_each_time():
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, check=True)
    applied, before, after = out.stdout.split()
    pages = 48e6 / 4096
    assert applied == "True"
    assert int(before) > 0.9 * pages  # default glibc: every page of the block faults in again
    assert int(after) < 0.01 * pages  # reused: the block's pages are already mapped
