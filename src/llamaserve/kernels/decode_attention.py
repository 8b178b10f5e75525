"""Python side of decode_attention.cpp: RoPE + cache write + attention for one new token per row."""

from __future__ import annotations

import ctypes
import math

import torch

from llamaserve import kernels

# The kernel works on 16-float vectors (decode_attention.cpp: LANES, MAX_HEAD_DIM).
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 16, 256
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURE = [
    _ptr, _i64, _i64,  # q, row stride, head stride
    _ptr, _ptr, _i64, _i64,  # new k, new v, row stride, head stride
    _ptr, _ptr, _ptr, _i64, _i64,  # rotation, key cache, value cache, n_slots, max_seq_len
    _ptr, _ptr, _ptr,  # slots, positions, out
    _i64, _i64, _i64, _i64, _f32,  # rows, heads, kv heads, head dim, scale
]


def _function():
    library = kernels.load("decode_attention")
    if library is None:
        return None
    function = library.llamaserve_decode_attention
    if function.argtypes is None:
        function.argtypes, function.restype = _SIGNATURE, ctypes.c_int
    return function


def available() -> bool:
    return _function() is not None


def supports(q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether a decode call with these tensors can take the kernel: fp32 CPU tensors, one new
    token per row, a head size the kernel handles, and the kernel built here."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and key_cache.dtype == torch.float32
        and q.dim() == 4
        and q.shape[1] == 1
        and q.shape[-1] % HEAD_DIM_MULTIPLE == 0
        and q.shape[-1] <= MAX_HEAD_DIM
        and available()
    )


def decode_attention(
    q: torch.Tensor,  # [B, 1, heads, hd]
    k: torch.Tensor,  # [B, 1, kv_heads, hd], before RoPE
    v: torch.Tensor,  # [B, 1, kv_heads, hd]
    rotation: torch.Tensor,  # complex [B, 1, 1, hd/2]
    key_cache: torch.Tensor,  # [slots, kv_heads, max_seq_len, hd]
    value_cache: torch.Tensor,
    slots: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    """Writes each row's RoPE'd key and its value at (slot, position) and returns attention over
    positions 0..position of its slot: [B, 1, heads, hd]."""
    rows, _, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if k.stride() != v.stride() or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q/k/v need a contiguous last dimension, and k and v the same strides")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    rotation = torch.view_as_real(rotation.reshape(rows, head_dim // 2)).contiguous()
    slots = slots.to(torch.int64).contiguous()
    positions = positions.reshape(rows).to(torch.int64).contiguous()
    out = torch.empty(rows, 1, heads, head_dim)
    status = _function()(
        q.data_ptr(), q.stride(0), q.stride(2),
        k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(2),
        rotation.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), key_cache.shape[0], key_cache.shape[2],
        slots.data_ptr(), positions.data_ptr(), out.data_ptr(),
        rows, heads, kv_heads, head_dim, 1.0 / math.sqrt(head_dim),
    )
    if status != 0:
        raise ValueError(f"decode_attention rejected its arguments (code {status}): "
                         f"heads a multiple of kv_heads, head_dim a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}, "
                         "slots and positions inside the cache")
    return out
