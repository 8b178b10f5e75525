"""Python side of pointwise.cpp: residual add + RMSNorm, and SwiGLU, for decode-sized inputs."""

from __future__ import annotations

import ctypes

import torch

from llamaserve import kernels

# The kernels work on 16-float vectors.
DIM_MULTIPLE = 16
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _add_rms_norm():
    return kernels.function("pointwise", "llamaserve_add_rms_norm", [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32])


def _silu_mul():
    return kernels.function("pointwise", "llamaserve_silu_mul", [_ptr, _ptr, _i64, _i64])


def supports(x: torch.Tensor) -> bool:
    """Whether x (an fp32 CPU activation, rows along all but the last dim) can take these kernels."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[-1] % DIM_MULTIPLE == 0
        and _add_rms_norm() is not None
    )


def _check(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(f"{what}: the last dimension must be a positive multiple of {DIM_MULTIPLE}")


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h) * weight) with h = x + delta, or x itself when delta is None."""
    dim = x.shape[-1]
    # Contiguous copies are bound to names: a temporary would be freed before the C call runs.
    x, weight = x.contiguous(), weight.contiguous()
    delta = None if delta is None else delta.contiguous()
    h = x if delta is None else torch.empty_like(x)
    normed = torch.empty_like(x)
    status = _add_rms_norm()(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
        None if delta is None else h.data_ptr(), normed.data_ptr(), x.numel() // dim, dim, eps)
    _check(status, "add_rms_norm")
    return h, normed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate_up [..., 2 * hidden] holds gate then up."""
    gate_up = gate_up.contiguous()
    hidden = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], hidden)
    rows = out.numel() // max(hidden, 1)
    _check(_silu_mul()(gate_up.data_ptr(), out.data_ptr(), rows, hidden), "silu_mul")
    return out
