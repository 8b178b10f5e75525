"""Python side of sampling.cpp: whole-vocabulary draws (temperature, top-p, min-p) per row."""

from __future__ import annotations

import ctypes

import torch

from llamaserve import kernels

# What a row's token says besides a token id.
REFUSED, NOT_FINITE = -1, -2
_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


def _function():
    return kernels.function("sampling", "llamaserve_sample_whole", [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr])


def fits(logits: torch.Tensor) -> bool:
    """Whether rows of these logits can be sampled by the kernel: fp32 on CPU, kernel built."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and _function() is not None


def sample_whole(
    x: torch.Tensor, temperature: list[float], top_p: list[float], min_p: list[float], uniforms: list[list[float]]
) -> list[int]:
    """x [n, V] contiguous fp32 logits, overwritten with exp(x / T - max(x / T)) per row; one
    token per row, REFUSED when all its uniforms were refused, NOT_FINITE when its maximum is
    not finite (that row is left as it was). uniforms [n][draws], used in order."""
    if not x.is_contiguous() or x.dtype != torch.float32:
        raise ValueError("sample_whole wants contiguous float32 logits")
    rows, vocab = x.shape
    draws = len(uniforms[0])
    inv_temp = torch.tensor([1.0 / t for t in temperature], dtype=torch.float32)
    top_p_t = torch.tensor(top_p, dtype=torch.float32)
    min_p_t = torch.tensor(min_p, dtype=torch.float32)
    u = torch.tensor(uniforms, dtype=torch.float64)
    tokens = torch.empty(rows, dtype=torch.int64)
    status = _function()(x.data_ptr(), rows, vocab, inv_temp.data_ptr(), top_p_t.data_ptr(), min_p_t.data_ptr(),
                         u.data_ptr(), draws, tokens.data_ptr())
    if status != 0:
        raise ValueError(f"sample_whole rejected its arguments (code {status})")
    return tokens.tolist()
