"""Whether this process's CPU linear kernels give a row the same bits for any decode row count.

Engine determinism rests on it (engine/runner.py): a decode call's row count depends on who else
is running, so a row's logits must not. Matrix libraries choose their kernel by the row count,
and which counts share a kernel differs between CPUs and thread counts (model/cpu_linear.py), so a
constant measured on one CPU cannot be trusted on another: the runner checks the path its model
will take, once per process, on random data (a different kernel changes bits in almost every
output, so random rows show it) and falls back to one row count for every call if it fails.
"""

from __future__ import annotations

import functools

import torch

from llamaserve.model.cpu_linear import CPU_ROW_STABLE_MIN, pack_weight, packed_linear, row_stable_mm

PROBE_OUT_FEATURES = 128
DENSE_UP_TO = 33  # every row count up to here; beyond, a sample around powers of two and the end


def probe_row_counts(max_rows: int) -> list[int]:
    counts = set(range(CPU_ROW_STABLE_MIN, min(max_rows, DENSE_UP_TO) + 1))
    counts |= {r for p in (48, 64, 128, 256, 512, 1024) for r in (p - 1, p, p + 1) if r <= max_rows}
    counts.add(max(max_rows, CPU_ROW_STABLE_MIN))
    return sorted(counts)


@functools.cache
def linear_rows_stable(dtype: torch.dtype, packed: bool, in_features: tuple[int, ...], max_rows: int) -> bool:
    """Whether the CPU linear path (packed oneDNN weights, or `row_stable_mm`) gives each row the
    same bits for every row count from CPU_ROW_STABLE_MIN to `max_rows`, at each input width."""
    gen = torch.Generator().manual_seed(0)
    counts = probe_row_counts(max_rows)
    for width in in_features:
        weight = (torch.randn(PROBE_OUT_FEATURES, width, generator=gen) * 0.02).to(dtype)
        x = torch.randn(counts[-1], width, generator=gen).to(dtype)
        if packed:
            packed_weight = pack_weight(weight)
            def linear(rows): return packed_linear(rows, packed_weight, PROBE_OUT_FEATURES)
        else:
            def linear(rows): return row_stable_mm(rows, weight)
        full = linear(x)
        if any(not torch.equal(linear(x[:rows]), full[:rows]) for rows in counts):
            return False
    return True


def model_rows_stable(model, max_rows: int) -> bool:
    """linear_rows_stable for the layers of `model` (True for a model without linear layers)."""
    widths = tuple(sorted({m.in_features for m in model.modules() if hasattr(m, "in_features")}))
    if not widths:
        return True
    return linear_rows_stable(model.dtype, bool(getattr(model, "packed", False)), widths, max_rows)
