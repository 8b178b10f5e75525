"""int8 weights on CUDA through one fused Triton kernel: the int8 tile is widened to the
activations' dtype in registers, multiplied on the tensor cores with fp32 sums, and the channel
scale applied once to the sums. Without it QuantLinear converts the whole weight to bf16 on every
call and then reads it again for the matmul (benchmarks/README.md: int8 was 1.5x slower than
bf16 per step on an H200), so int8 read 3x the bytes of int8.

Triton is imported on first use on a CUDA device only: CPU processes never import it. Fixed tile
sizes per row-count class, no autotuning and no split-K: a row's result is one fixed sequence of
tile products whatever the other rows hold. bf16 and fp16 activations only (fp32 ones keep the
dequantising path: Triton's fp32 dot would round through TF32). LLAMASERVE_TRITON=0 turns it
off; a kernel that fails to build is logged once and the dequantising path takes over.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "LLAMASERVE_TRITON"
BLOCK_N, BLOCK_K, NUM_WARPS = 64, 128, 4
_kernel = None  # (triton, the jitted kernel); False once it failed here; None before the first use
_launched = False  # the first launch compiles the kernel, and may fail doing so


def _row_block(rows: int) -> int:
    """Rows per tile: tensor-core dots need 16 at least; decode calls (<= 64 rows) fit one tile."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(x, w.to(x.dtype))  # int8 values are exact in bf16 and fp16
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        out = acc * scale[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return triton, int8_matmul


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T (int8 [out, in]) runs on the fused kernel here."""
    return (x.device.type == "cuda" and weight.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16)
            and _kernel is not False and os.environ.get(ENV, "1") != "0")


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] @ (weight [out, in] * scale [out, 1])^T in x's dtype, or None where the kernel
    cannot be built here (then the caller dequantises)."""
    global _kernel, _launched
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception as err:  # no triton here: the dequantising path
            return _unavailable(err)
    if _kernel is False:
        return None
    triton, kernel = _kernel
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    weight, scale = weight.contiguous(), scale.float().contiguous()
    rows, (out_features, in_features) = flat.shape[0], weight.shape
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block_m = _row_block(rows)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, BLOCK_N))
    try:
        kernel[grid](flat, weight, scale, out, rows, out_features, in_features, flat.stride(0), weight.stride(0),
                     out.stride(0), BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    except Exception as err:
        if _launched:
            raise
        return _unavailable(err)  # it did not compile here
    _launched = True
    return out.view(*x.shape[:-1], out_features)


def _unavailable(err: Exception) -> None:
    global _kernel
    _kernel = False
    log.warning("int8 Triton kernel unavailable, int8 layers dequantise on every call: %s", err)
    return None
