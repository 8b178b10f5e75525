import os

import torch

# The suite checks the fp32 path against transformers bit-closely; on CPUs with bf16 arithmetic
# "auto" would pick bf16 weights. Tests of the bf16 default (test_cpu_dtype.py) unset this.
os.environ.setdefault("LLAMASERVE_CPU_BF16", "0")

# Two cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
