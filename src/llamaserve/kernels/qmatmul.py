"""Python side of qmatmul.cpp: matmuls that read bf16 / int8 / int4 weights as stored.

`PackedWeight` holds one weight in the kernel's layout (columns in blocks of 64, k-major within
a block, zero-padded); `matmul` runs it on fp32 activations. Packing happens once, when a model
is made ready to serve; the plain tensors it came from are dropped by the caller.
"""

from __future__ import annotations

import ctypes

import torch

from llamaserve import kernels

BLOCK = 64
FORMATS = {"bf16": 16, "int8": 8, "int4": 4}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _function():
    return kernels.function("qmatmul", "llamaserve_qmatmul", [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr])


def available() -> bool:
    return _function() is not None


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N/64), C, 64]: column blocks, each c-major, padded rows of zeros."""
    pad = -t.shape[0] % BLOCK
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.view(-1, BLOCK, t.shape[1]).transpose(1, 2).contiguous()


class PackedWeight:
    """One weight [out_features, in_features] in qmatmul.cpp's layout (`tensors()` in the order
    the all-layers op takes them: weights, aux, meta)."""

    def __init__(self, fmt: str, n: int, k: int, weights: torch.Tensor, aux: torch.Tensor, group: int = 0) -> None:
        self.fmt, self.n, self.k, self.group = fmt, n, k, group
        self.weights, self.aux = weights, aux
        self.meta = torch.tensor([FORMATS[fmt], n, k, group], dtype=torch.int64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weights, self.aux, self.meta]


def pack_bf16(weight: torch.Tensor) -> PackedWeight:
    n, k = weight.shape
    return PackedWeight("bf16", n, k, _blocks(weight.to(torch.bfloat16).view(torch.int16)), torch.empty(0))


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> PackedWeight:
    """q int8 [N, K], scale fp32 [N] (w = q * scale)."""
    n, k = q.shape
    padded = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=torch.float32)
    padded[:n] = scale.float()
    return PackedWeight("int8", n, k, _blocks(q), padded)


def pack_int4(nibbles: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, k: int) -> PackedWeight:
    """nibbles uint8 [N, ceil(K/2)] (k even in the low half), scale and offset fp16 [N, K/group]
    (w = q * scale + offset)."""
    n, groups = scale.shape
    per_block = torch.stack([_blocks(scale.to(torch.float16)), _blocks(offset.to(torch.float16))], dim=2)
    return PackedWeight("int4", n, k, _blocks(nibbles), per_block.view(torch.int16).contiguous(), k // groups)


class Fused:
    """Same-input layers (q/k/v; w1/w3) as one packed matmul: one weight pass and one call."""

    def __init__(self, packed: PackedWeight, sizes: list[int]) -> None:
        self.packed, self.sizes = packed, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side in one tensor, unsplit."""
        return matmul(x, self.packed)


def matmul(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """x [..., K] fp32 on CPU -> [..., N] fp32 (row-major)."""
    flat = x.reshape(-1, packed.k).contiguous()
    out = torch.empty(flat.shape[0], packed.n, dtype=torch.float32)
    status = _function()(flat.data_ptr(), flat.shape[0], packed.k, packed.n, FORMATS[packed.fmt], packed.group,
                         packed.weights.data_ptr(), packed.aux.data_ptr(), out.data_ptr())
    if status != 0:
        raise ValueError(f"qmatmul rejected its arguments (code {status}): {packed.fmt} [{packed.n}, {packed.k}]"
                         f" group {packed.group}")
    return out.view(*x.shape[:-1], packed.n)
