"""Freed memory stays in the process (llamaserve/allocator.py): a step's tensors of the same sizes
as the last step's reuse its pages instead of faulting fresh, kernel-zeroed ones in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from llamaserve.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# 16 MB tensors (32 users' logits of a 128k vocabulary), allocated, written and freed 5 times
# after a first one: the page faults those 5 took.
FAULTS = """
import llamaserve, torch, resource
x = torch.empty(4 * 2**20); x.fill_(1); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = torch.empty(4 * 2**20); y.fill_(1); del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120,
                         env={**clean, **env}, check=True)
    return int(out.stdout.split()[-1])


def test_freed_tensors_are_reused_without_faulting_pages_in_again():
    # The fewest of three processes: now and then the kernel faults a few hundred pages in anyway
    # (seen: 520 in 1 of 6 runs, THP splitting or compaction), against about 2,600 every time
    # with the opt-out.
    kept, returned = min(faults() for _ in range(3)), faults(LLAMASERVE_MALLOC_TUNING="0")
    assert kept < 50, f"{kept} page faults re-allocating freed 16 MB tensors"
    assert returned > 10 * (kept + 10), (kept, returned)  # the opt-out shows what it saves


def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("LLAMASERVE_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
