"""Keep freed memory in the process instead of handing it back to the kernel after every step.

glibc serves allocations of 128 KB and more (its threshold then grows with use, up to 32 MB) with
fresh mmaps and unmaps them on free, and returns the top of its heap above 128 KB on free. A
decode step allocates tensors of the same sizes every time (the 32-user logits of a 128k
vocabulary alone are 16 MB), so each step faulted those pages in again, each zeroed by the kernel:
11% of a 32-user bf16 step on the benchmark model went to clearing pages (perf), and keeping the
memory made the step 10-20% faster (benchmarks/README.md). Allocations below 32 MB (glibc's largest
allowed threshold) then come from the heap, and up to 1 GiB of freed heap stays mapped for reuse:
memory a server holding gigabytes of weights can spare.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
# Set by the user (glibc reads these itself at start), or LLAMASERVE_MALLOC_TUNING=0: left alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set."""
    if os.environ.get("LLAMASERVE_MALLOC_TUNING", "1") == "0" or any(v in os.environ for v in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
