"""Weights and the KV cache live in transparent huge pages where the kernel offers them: decode
streams them every step, and 4 KB pages cost a TLB miss every 4 KB (benchmarks/README.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    try:
        return re.search(r"\[(\w+)\]", THP_MODE.read_text()).group(1)
    except (OSError, AttributeError):
        return None


pytestmark = pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="no transparent huge pages here")

HUGE_KB = "int(next(l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))"


def huge_kb_after(code: str, **env: str) -> int:
    script = f"import llamaserve, torch\n{code}\nprint({HUGE_KB})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env}, check=True)
    return int(result.stdout.split()[-1])


def test_large_torch_allocations_get_huge_pages():
    assert huge_kb_after("x = torch.ones(16 * 2**20)") >= 32 * 1024  # of the 64 MB tensor


@pytest.mark.skipif(thp_mode() != "madvise", reason="with THP 'always' every allocation gets them anyway")
def test_opting_out_keeps_4k_pages():
    assert huge_kb_after("x = torch.ones(16 * 2**20)", THP_MEM_ALLOC_ENABLE="0") == 0


def test_kv_cache_gets_huge_pages():
    code = (
        "from llamaserve.model.kv_cache import KVCache\n"
        "cache = KVCache(1, 32, 4, 512, 64, torch.float32, 'cpu')\n"
        "cache.keys[0].fill_(1.0)"
    )
    assert huge_kb_after(code, THP_MEM_ALLOC_ENABLE="0") >= 8 * 1024  # of the 16 MB key tensor
