"""Python side of decode_attention.cpp: RoPE + cache write + attention through block tables, one
row per new token (a decode step's rows, or a prefill chunk's)."""

from __future__ import annotations

import ctypes
import math

import torch

from llamaserve import kernels

# The kernel works on 16-float vectors (decode_attention.cpp: LANES, MAX_HEAD_DIM).
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 16, 256
# A bf16 cache is laid out for `vdpbf16ps` (32 bf16 at a time) in blocks of one 16-key tile.
BF16_HEAD_DIM_MULTIPLE, BF16_BLOCK_SIZE = 32, 16
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURE = [
    _ptr, _i64, _i64,  # q, row stride, head stride
    _ptr, _ptr, _i64, _i64,  # new k, new v, row stride, head stride
    _ptr, _ptr, _ptr, _i64, _i64, _i64,  # rotation, key cache, value cache, bf16 cache?, n_blocks, block_size
    _ptr, _i64, _i64,  # block tables, their rows, blocks per row
    _ptr, _ptr, _ptr,  # slots, positions, out
    _i64, _i64, _i64, _i64, _f32,  # rows, heads, kv heads, head dim, scale
]


def _function():
    return kernels.function("decode_attention", "llamaserve_decode_attention", _SIGNATURE)


def available() -> bool:
    return _function() is not None


def bf16_cache_available(head_dim: int) -> bool:
    """Whether the kernel takes a bf16 cache for this head size here: built with AVX512-BF16
    (`vdpbf16ps`), head_dim a multiple of 32."""
    found = kernels.function("decode_attention", "llamaserve_decode_attention_bf16_cache", [])
    return found is not None and bool(found()) and head_dim % BF16_HEAD_DIM_MULTIPLE == 0 and head_dim <= MAX_HEAD_DIM


def cache_supported(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel reads and writes a cache of this dtype for this head size."""
    return cache_dtype == torch.float32 or (cache_dtype == torch.bfloat16 and bf16_cache_available(head_dim))


def supports(q_shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decode queries of this shape ([B, 1, heads, head_dim]) can take the kernel: fp32
    on CPU, a head size the kernel handles, and the kernel built here."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and len(q_shape) == 4
        and q_shape[1] == 1
        and q_shape[-1] % HEAD_DIM_MULTIPLE == 0
        and q_shape[-1] <= MAX_HEAD_DIM
        and available()
    )


def bf16_blocks_as_rows(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of a bf16 cache in the kernel's layout ([..., 16, head_dim] as stored: keys in dim
    pairs across 16 position lanes, values in position pairs; decode_attention.cpp, "bf16
    cache") as plain rows [..., 16, head_dim] of positions. For tests and inspection."""
    *lead, block, head_dim = keys.shape
    if block != BF16_BLOCK_SIZE or values.shape != keys.shape:
        raise ValueError(f"bf16 kernel blocks are [..., {BF16_BLOCK_SIZE}, head_dim], got {tuple(keys.shape)}")
    k = keys.reshape(*lead, head_dim // 2, block, 2).transpose(-3, -2).reshape(*lead, block, head_dim)
    v = values.reshape(*lead, block // 2, head_dim, 2).transpose(-2, -1).reshape(*lead, block, head_dim)
    return k, v


class DecodeRows:
    """What the kernel needs of a decode call's rows, prepared once for all layers."""

    def __init__(self, rotation: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 block_tables: torch.Tensor) -> None:
        """rotation: complex [B, 1, 1, hd/2]; slots [B] rows of block_tables [n, max_blocks];
        positions [B] or [B, 1]."""
        self.block_tables = block_tables.to(torch.int64).contiguous()
        self.count = slots.shape[0]
        self.rotation = torch.view_as_real(rotation.reshape(self.count, -1)).contiguous()
        self.slots = slots.to(torch.int64).contiguous()
        self.positions = positions.reshape(self.count).to(torch.int64).contiguous()


def decode_attention(
    q: torch.Tensor,  # [B, 1, heads, hd]
    k: torch.Tensor,  # [B, 1, kv_heads, hd], before RoPE
    v: torch.Tensor,  # [B, 1, kv_heads, hd]
    rows: DecodeRows,
    key_cache: torch.Tensor,  # [n_blocks, kv_heads, block_size, hd], fp32 or bf16
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64 contiguous: the blocks of each slot
) -> torch.Tensor:
    """Writes each row's RoPE'd key and its value at its position of its slot (through the
    slot's block table) and returns attention over positions 0..position: [B, 1, heads, hd]."""
    count, _, heads, head_dim = q.shape
    k_strides = k.stride()
    if k_strides != v.stride() or q.stride(-1) != 1 or k_strides[-1] != 1:
        raise ValueError("q/k/v need a contiguous last dimension, and k and v the same strides")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    if not (block_tables.is_contiguous() and block_tables.dtype == torch.int64):
        raise ValueError("block tables must be contiguous int64")
    if key_cache.dtype != value_cache.dtype or not cache_supported(key_cache.dtype, head_dim):
        raise ValueError(f"the kernel takes an fp32 cache, or a bf16 one (in its own layout: bf16_blocks_as_rows) "
                         f"where it was built with AVX512-BF16 and head_dim is a multiple of {BF16_HEAD_DIM_MULTIPLE}; "
                         f"got {key_cache.dtype}/{value_cache.dtype}")
    out = torch.empty(count, 1, heads, head_dim)
    status = _function()(
        q.data_ptr(), q.stride(0), q.stride(2),
        k.data_ptr(), v.data_ptr(), k_strides[0], k_strides[2],
        rows.rotation.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), int(key_cache.dtype == torch.bfloat16),
        key_cache.shape[0], key_cache.shape[2],
        block_tables.data_ptr(), block_tables.shape[0], block_tables.shape[1],
        rows.slots.data_ptr(), rows.positions.data_ptr(), out.data_ptr(),
        count, heads, k.shape[2], head_dim, 1.0 / math.sqrt(head_dim),
    )
    if status != 0:
        raise ValueError(f"decode_attention rejected its arguments (code {status}): "
                         f"heads a multiple of kv_heads, head_dim a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}, "
                         f"block size a multiple of {HEAD_DIM_MULTIPLE} (exactly {BF16_BLOCK_SIZE} with a bf16 cache), slots, positions and blocks inside the cache")
    return out
