"""The linear layer of the CPU serving path and its packings: rows whose bits do not depend on
the row count (oneDNN inner products, plain or packed; bf16 weights on the qmatmul kernel), and
same-input layers fused into one matmul. model/llama.py builds its layers from `Linear`;
model/cpu_backend.py packs and fuses them for serving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.kernels import qmatmul


# Fewest rows of a CPU linear call whose rows do not depend on the row count. oneDNN's inner
# product (packed weights, and plain fp32 ones: `row_stable_mm`) gives each row the same bits
# for any row count from 2 up, whatever the other rows hold; one row takes another kernel.
# Measured with torch 2.13 on Intel AMX and AMD Zen 4 (AVX-512, no AMX) up to 300 rows, where
# MKL's sgemm (F.linear, torch.mm) changes a row's bits at 4, 12 or 16 rows depending on the CPU.
# Each process checks it again for its own CPU and thread count (`linear_rows_stable`) and the
# runner falls back to one row count for every decode call where the check fails.
CPU_ROW_STABLE_MIN = 2
# Row counts up to which tests/test_batch_invariance.py checks every count; the startup check
# samples beyond.
PACKED_ROW_STABLE_MIN, PACKED_ROW_STABLE_MAX = CPU_ROW_STABLE_MIN, 256
# The row count oneDNN tunes the packed layout for. The layout decides the rounding, so it is
# one constant, never the batch at hand.
PACK_ROWS_HINT = 32
# Asked once: torch.compile cannot trace the query inside a step (tests/test_compile_decode.py).
MKLDNN = torch.backends.mkldnn.is_available()


def row_stable_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight^T for an unpacked CPU weight with each row's bits independent of the row count
    (from CPU_ROW_STABLE_MIN rows) and of the other rows, or None off the CPU or below that.

    fp32 goes through oneDNN's inner product on the plain weight (the packed path's kernels);
    other dtypes through `weight @ x^T`, transposed ([rows, out] column-major: callers copy it to
    row-major). `linear_rows_stable` checks either at startup."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows < CPU_ROW_STABLE_MIN:
        return None
    flat = x.reshape(rows, -1)
    if weight.dtype == torch.float32 and MKLDNN:
        return torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, None, "none", [], "")
    return torch.mm(weight, flat.t()).t()


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.is_meta
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "").view(*x.shape[:-1], out_features)


def drop_weight(layer: nn.Linear) -> None:
    # A meta stand-in keeps shape and dtype once the packed copy replaces the plain weight.
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)


class FusedProjection:
    """Several same-input linear layers as one packed matmul (q/k/v; w1/w3): one weight pass
    and one call instead of several, which matters where a call costs ~50 us on its own."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.sizes = [layer.out_features for layer in layers]
        self.packed = pack_weight(torch.cat([layer.weight.detach() for layer in layers]))
        for layer in layers:
            drop_weight(layer)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side in one tensor, unsplit."""
        return packed_linear(x, self.packed, sum(self.sizes))


def kernel_bf16(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight runs on the qmatmul kernel (CPU, built here): read as bf16, times
    the fp32 activations rounded to bf16 (cpu_backend.pack_weights, kernels/qmatmul.cpp)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not weight.is_meta
            and qmatmul.available())


def fuse_projections(layers: list[nn.Module]):
    """Same-input layers as one matmul: a FusedProjection of packable fp32 layers, bf16 ones on
    the qmatmul kernel, or what the layers' own class fuses them into (quantised ones:
    weights/quant.py), else None."""
    if all(isinstance(w, Linear) and can_pack(w.weight) for w in layers):
        return FusedProjection(layers)
    if all(isinstance(w, Linear) and kernel_bf16(w.weight) for w in layers):
        fused = qmatmul.Fused(qmatmul.pack_bf16(torch.cat([w.weight.detach() for w in layers])),
                              [w.out_features for w in layers])
        for layer in layers:
            drop_weight(layer)
        return fused
    fuse = getattr(type(layers[0]), "fuse", None)
    return fuse(layers) if fuse is not None else None


class Linear(nn.Linear):
    """nn.Linear whose rows do not depend on the rest of the batch (see the constants above)."""

    packed_weight: torch.Tensor | qmatmul.PackedWeight | None = None

    def pack(self) -> bool:
        """Reorder the weight into oneDNN's layout for CPU inference; False where that does not
        apply. The plain weight is dropped (a meta stand-in keeps its shape and dtype), so a
        packed layer has no usable state_dict: pack only a model that is ready to serve."""
        if self.packed_weight is not None:
            return True
        if kernel_bf16(self.weight):
            self.packed_weight = qmatmul.pack_bf16(self.weight.detach())
        elif can_pack(self.weight):
            self.packed_weight = pack_weight(self.weight)
        else:
            return False
        drop_weight(self)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.packed_weight, qmatmul.PackedWeight):
            return qmatmul.matmul(x, self.packed_weight)
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.out_features)
        out = row_stable_mm(x, self.weight)
        if out is None:
            return F.linear(x, self.weight)
        return out.contiguous().view(*x.shape[:-1], -1)
