"""Decode attention on CUDA read in place through the block tables: one Triton program per (row,
KV head) walks the row's own blocks, so no contiguous copy of every row's keys and values is
gathered per step (AttentionPlan.gather: most of a decode step's attention traffic on a GPU).

Each program computes its query heads of one KV head over the keys of its own row, block by
block in position order, with an online softmax in fp32: the same operations whatever the other
rows, the batch size or their lengths, so a row's result is batch-invariant by construction.
Keys and values are read in the cache's dtype (bf16, fp16, fp32, fp8 e4m3) and widened to fp32.
Decode only (one query per row); prefill keeps torch's attention over gathered blocks.

Triton is imported on first use on a CUDA device only; LLAMASERVE_TRITON=0 turns this off and a
kernel that fails to build is logged once, after which torch's attention takes over. On a CPU,
TRITON_INTERPRET=1 runs the same kernel in Triton's interpreter (tests/test_cuda_attention.py).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "LLAMASERVE_TRITON"
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256
_kernel = None  # the jitted kernel; False once it failed here; None before the first use


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, out_ptr,
                     stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_tb, stride_ob, stride_oh, scale,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                     BLOCK: tl.constexpr):
        row, kv_head = tl.program_id(0), tl.program_id(1)
        g, d, t = tl.arange(0, GROUP_PAD), tl.arange(0, DIM_PAD), tl.arange(0, BLOCK)
        heads = kv_head * GROUP + g
        qmask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
        q = q.to(tl.float32)
        n_keys = tl.load(pos_ptr + row) + 1
        top = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
        for i in range(0, (n_keys + BLOCK - 1) // BLOCK):
            block = tl.load(table_ptr + row * stride_tb + i)
            at = block * stride_cb + kv_head * stride_ch + t[:, None] * stride_ct + d[None, :]
            seen = (i * BLOCK + t) < n_keys
            kvmask = seen[:, None] & (d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + at, mask=kvmask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + at, mask=kvmask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK]
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            rescale = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top[:, None])
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            top = new_top
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qmask)

    return triton, paged_decode


def applies(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether decode queries q [B, 1, heads, hd] over a layer's pool take the kernel here."""
    return (q.device.type == "cuda" and q.shape[1] == 1 and keys.dtype in CACHE_DTYPES
            and q.shape[-1] <= MAX_HEAD_DIM and _kernel is not False and os.environ.get(ENV, "1") != "0")


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
           positions: torch.Tensor) -> torch.Tensor | None:
    """Attention of q [B, heads, hd] (one query per row, after RoPE) over each row's keys
    0..positions[b] of pools [n_blocks, kv_heads, block_size, hd], read through tables
    [B, max_blocks]: [B, heads, hd] in q's dtype; None where the kernel cannot be built here."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception as err:  # no triton here: torch's attention
            _kernel = False
            log.warning("Triton paged attention is off, decode gathers the blocks for torch's attention: %s", err)
    if _kernel is False:
        return None
    triton, kernel = _kernel
    rows, heads, head_dim = q.shape
    _, kv_heads, block, _ = keys.shape
    if heads % kv_heads or keys.stride() != values.stride() or keys.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged decode attention: heads a multiple of kv_heads, caches alike with a contiguous last dim")
    group = heads // kv_heads
    tables = tables.to(torch.int64)
    positions = positions.reshape(rows).to(torch.int64)
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype, device=q.device)
    kernel[(rows, kv_heads)](
        q, keys, values, tables, positions, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), 1.0 / head_dim ** 0.5,
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK=block)
    return out
