"""Python side of qmatmul.cpp: matmuls that read bf16 / int8 / int4 weights as stored.

`PackedWeight` holds one weight in the kernel's layout (columns in blocks of 64, k-major within
a block, zero-padded); `matmul` runs it on fp32 activations (rounded per format, below). Packing happens once, when a model
is made ready to serve; the plain tensors it came from are dropped by the caller. On CPUs with
AVX512-BF16 and VNNI, bf16 and int4 weights are packed for the dot-product kernels
(qmatmul_dot.h); either way a format multiplies the activations rounded as `rounded_inputs`
rounds them, which is also what the torch fallback multiplies.
"""

from __future__ import annotations

import ctypes
import os

import torch

from llamaserve import kernels

BLOCK = 64
FORMATS = {"bf16": 16, "int8": 8, "int4": 4}
DOT_FORMATS = {"bf16": 17, "int4": 5}  # qmatmul_dot.h's layouts
INT4_DOT_GROUP_MULTIPLE = 8  # the int4 dot layout reads 8 k of a column per 32-bit word
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _function():
    return kernels.function("qmatmul", "llamaserve_qmatmul", [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr])


def available() -> bool:
    return _function() is not None


def dot_formats() -> bool:
    """Whether bf16 and int4 weights pack for the dot-product kernels here (built with
    AVX512-BF16 and VNNI); LLAMASERVE_QMATMUL_DOT=0 keeps the fp32 kernel whatever the CPU."""
    if os.environ.get("LLAMASERVE_QMATMUL_DOT", "1") == "0":
        return False
    found = kernels.function("qmatmul", "llamaserve_qmatmul_dot_formats", [])
    return found is not None and bool(found())


def rounded_inputs(x: torch.Tensor, fmt: str, group: int = 0) -> torch.Tensor:
    """x as a weight format multiplies it (qmatmul.cpp, on every CPU): rounded to bf16 for bf16
    weights; to int8 per `group` values of a row for int4 (x ~= q * d, d = max |x| / 127,
    q = x * (127 / max |x|) rounded to nearest even); unchanged for int8. Same dtype as x; each
    row from its own values."""
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if fmt != "int4":
        return x
    groups = x.float().reshape(-1, x.shape[-1] // group, group)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = 127 / torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.where(amax > 0, torch.round(groups * inverse), torch.zeros_like(groups))
    return (q * (amax / 127)).view(x.shape).to(x.dtype)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N/64), C, 64]: column blocks, each c-major, padded rows of zeros."""
    pad = -t.shape[0] % BLOCK
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.view(-1, BLOCK, t.shape[1]).transpose(1, 2).contiguous()


class PackedWeight:
    """One weight [out_features, in_features] in qmatmul.cpp's layout (`tensors()` in the order
    the all-layers op takes them: weights, aux, meta)."""

    def __init__(self, fmt: str, n: int, k: int, weights: torch.Tensor, aux: torch.Tensor, group: int = 0,
                 dot: bool = False) -> None:
        self.fmt, self.n, self.k, self.group = fmt, n, k, group
        self.code = DOT_FORMATS[fmt] if dot else FORMATS[fmt]  # the kernel's format number
        self.weights, self.aux = weights, aux
        self.meta = torch.tensor([self.code, n, k, group], dtype=torch.int64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weights, self.aux, self.meta]


def pack_bf16(weight: torch.Tensor, dot: bool | None = None) -> PackedWeight:
    """dot: the dot-product layout (default: where this CPU's kernels have it)."""
    n, k = weight.shape
    bits = weight.to(torch.bfloat16).view(torch.int16)
    if not (dot_formats() if dot is None else dot):
        return PackedWeight("bf16", n, k, _blocks(bits), torch.empty(0))
    if k % 2:
        bits = torch.cat([bits, bits.new_zeros(n, 1)], dim=1)
    pairs = bits.contiguous().view(torch.int32)  # little-endian: k even in the low half
    return PackedWeight("bf16", n, k, _blocks(pairs), torch.empty(0), dot=True)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> PackedWeight:
    """q int8 [N, K], scale fp32 [N] (w = q * scale)."""
    n, k = q.shape
    padded = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=torch.float32)
    padded[:n] = scale.float()
    return PackedWeight("int8", n, k, _blocks(q), padded)


def pack_int4(nibbles: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, k: int,
              dot: bool | None = None) -> PackedWeight:
    """nibbles uint8 [N, ceil(K/2)] (k even in the low half), scale and offset fp16 [N, K/group]
    (w = q * scale + offset). dot: the dot-product layout where the group takes it (default:
    where this CPU's kernels have it)."""
    n, groups = scale.shape
    group = k // groups
    per_block = torch.stack([_blocks(scale.to(torch.float16)), _blocks(offset.to(torch.float16))], dim=2)
    aux = per_block.view(torch.int16).contiguous()
    if not (dot_formats() if dot is None else dot) or group % INT4_DOT_GROUP_MULTIPLE:
        return PackedWeight("int4", n, k, _blocks(nibbles), aux, group)
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(n, -1)[:, :k].reshape(n, k // 8, 2, 4)
    words = (q[:, :, 0] | (q[:, :, 1] << 4)).contiguous().view(torch.int32).view(n, k // 8)
    return PackedWeight("int4", n, k, _blocks(words), aux, group, dot=True)


class Fused:
    """Same-input layers (q/k/v; w1/w3) as one packed matmul: one weight pass and one call."""

    def __init__(self, packed: PackedWeight, sizes: list[int]) -> None:
        self.packed, self.sizes = packed, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side in one tensor, unsplit."""
        return matmul(x, self.packed)


def matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 on CPU -> [..., N] fp32 (row-major), into `out` [rows, N] when given."""
    flat = x.reshape(-1, packed.k).contiguous()
    if out is None:
        out = torch.empty(flat.shape[0], packed.n, dtype=torch.float32)
    elif out.shape != (flat.shape[0], packed.n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous fp32 [{flat.shape[0]}, {packed.n}], got {out.dtype} {list(out.shape)}")
    status = _function()(flat.data_ptr(), flat.shape[0], packed.k, packed.n, packed.code, packed.group,
                         packed.weights.data_ptr(), packed.aux.data_ptr(), out.data_ptr())
    if status != 0:
        raise ValueError(f"qmatmul rejected its arguments (code {status}): {packed.fmt} [{packed.n}, {packed.k}]"
                         f" group {packed.group}")
    return out.view(*x.shape[:-1], packed.n)
