"""Multiply-adds per second of kernels/qmatmul.cpp on the benchmark model's matmul shapes, per
weight format, kernel and row count (decode of 1 / 32 users, a 128-token prefill chunk).

    flock /tmp/bench.lock python benchmarks/qmatmul_speed.py --threads 1 --rows 1,32,128

Kernels: "fp32" widens each weight to fp32 and multiplies in fp32 FMAs (every CPU; the only
kernel before the dot-product ones), "dot" is qmatmul_dot.h (AVX512-BF16 `vdpbf16ps` for bf16,
VNNI `vpdpbusd` for int4; where the CPU has them). Each (format, kernel, rows) cell is the best
of --repeats timed passes over every shape of one layer plus the output head (wqkv, wo, w13, w2
of dim 768 / hidden 2048 and the 128256-row head): what one decode step's matmuls get per
layer; GMAC/s = rows * weights / time. Every cell is measured in turn within each repeat, so a
busy neighbour slows all of them alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from llamaserve.kernels import qmatmul
from llamaserve.weights.quant import quantize_int4, quantize_tensor

# [out_features, in_features]: q/k/v fused, wo, w1/w3 fused, w2, the head.
SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048), (128256, 768)]
CASES = [("bf16", False), ("bf16", True), ("int8", False), ("int4", False), ("int4", True)]


def packed(fmt: str, dot: bool, n: int, k: int) -> qmatmul.PackedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.02
    if fmt == "int8":
        return qmatmul.pack_int8(*quantize_tensor(w))
    if fmt == "int4":
        return qmatmul.pack_int4(*quantize_int4(w), k, dot=dot)
    return qmatmul.pack_bf16(w, dot=dot)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,32,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    rows_list = [int(r) for r in ns.rows.split(",")]
    cases = [c for c in CASES if not c[1] or qmatmul.dot_formats()]
    weights = {c: [packed(*c, n, k) for n, k in SHAPES] for c in cases}
    inputs = {(m, k): torch.randn(m, k) for m in rows_list for _, k in SHAPES}
    # Outputs allocated once: a fresh 65 MB head output per call would time page faults.
    outs = {(m, n): torch.empty(m, n) for m in rows_list for n, _ in SHAPES}
    best = {(c, m): float("inf") for c in cases for m in rows_list}
    for _ in range(ns.repeats):
        for m in rows_list:
            for c in cases:
                for (n, k), w in zip(SHAPES, weights[c]):  # warm
                    qmatmul.matmul(inputs[m, k], w, out=outs[m, n])
                t = time.perf_counter()
                for (n, k), w in zip(SHAPES, weights[c]):
                    qmatmul.matmul(inputs[m, k], w, out=outs[m, n])
                best[c, m] = min(best[c, m], time.perf_counter() - t)
    macs = sum(n * k for n, k in SHAPES)
    print(f"{ns.threads} threads, best of {ns.repeats}; one layer's matmuls + the head ({macs / 1e6:.0f} M weights)\n")
    print("| format | kernel | " + " | ".join(f"{m} row{'s' * (m > 1)}: ms, GMAC/s" for m in rows_list) + " |")
    print("|---" * (len(rows_list) + 2) + "|")
    for c in cases:
        cells = [f"{best[c, m] * 1e3:.2f}, {m * macs / best[c, m] / 1e9:.0f}" for m in rows_list]
        print(f"| {c[0]} | {'dot' if c[1] else 'fp32'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
