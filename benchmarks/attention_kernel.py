"""The CPU attention kernel alone (kernels/decode_attention.cpp), fp32 cache against bf16 cache, in
one process: one layer's call, medians of 30.

    python benchmarks/attention_kernel.py 32 340          # a 32-user decode step's layer at 340 keys
    python benchmarks/attention_kernel.py 500 2000 50     # 10 users' 50-token prompt chunks at 2,000 keys

Arguments: rows, keys before the rows, rows per sequence (1: decode; more: a prefill chunk's
consecutive positions), threads (default 2). Shape of the benchmark model: 12 heads, 4 KV heads
of 64. G MAC/s counts the scores' and the values' multiply-adds.
"""

from __future__ import annotations

import argparse
import time

import torch

from llamaserve.kernels import decode_attention as kernel

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", type=int)
    p.add_argument("keys", type=int)
    p.add_argument("rows_per_sequence", type=int, nargs="?", default=1)
    p.add_argument("threads", type=int, nargs="?", default=2)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    sequences = ns.rows // ns.rows_per_sequence
    rows = sequences * ns.rows_per_sequence
    per_sequence = (ns.keys + ns.rows_per_sequence + BLOCK - 1) // BLOCK + 1
    dtypes = [torch.float32] + ([torch.bfloat16] if kernel.bf16_cache_available(HEAD_DIM) else [])
    for dtype in dtypes:
        shape = (sequences * per_sequence + 1, KV_HEADS, BLOCK, HEAD_DIM)
        key_cache, value_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        tables = torch.cat([torch.arange(1, 1 + sequences * per_sequence).view(sequences, per_sequence),
                            torch.zeros(1, per_sequence, dtype=torch.long)])
        slots = torch.arange(sequences).repeat_interleave(ns.rows_per_sequence)
        positions = torch.tensor([ns.keys + i for i in range(ns.rows_per_sequence)] * sequences)
        q = torch.randn(rows, 1, HEADS, HEAD_DIM)
        k, v = torch.randn(rows, 1, KV_HEADS, HEAD_DIM), torch.randn(rows, 1, KV_HEADS, HEAD_DIM)
        angles = positions.float()[:, None, None, None] * torch.full((1, 1, 1, HEAD_DIM // 2), 0.01)
        spec = kernel.DecodeRows(torch.polar(torch.ones_like(angles), angles), slots, positions, tables)
        times = []
        for i in range(33):
            t = time.perf_counter()
            kernel.decode_attention(q, k, v, spec, key_cache, value_cache, spec.block_tables)
            if i >= 3:
                times.append(time.perf_counter() - t)
        median = sorted(times)[len(times) // 2]
        macs = rows * HEADS * (ns.keys + 1) * HEAD_DIM * 2
        print(f"{str(dtype).removeprefix('torch.')} cache: {rows} rows ({ns.rows_per_sequence} a sequence) at "
              f"{ns.keys} keys: {median * 1e3:.3f} ms per layer, {macs / median / 1e9:.1f} G MAC/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
