"""llamaserve: an inference API server for Llama 2 and Llama 3 on PyTorch."""

import os

# Ask torch's CPU allocator for transparent huge pages on allocations of 2 MB and more (it reads
# this once, at its first allocation). Decode streams every weight once per step; with 4 KB
# pages that is a TLB miss every 4 KB, and the benchmark model's 1-user step took 35.5 ms
# against 32.4 ms with huge pages (same process layout, medians of 8). THP_MEM_ALLOC_ENABLE=0
# in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Freed memory stays in the process for the next step's tensors (llamaserve/allocator.py);
# LLAMASERVE_MALLOC_TUNING=0 opts out.
from llamaserve.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()
