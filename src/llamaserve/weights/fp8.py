"""FP8 weights (`--quantize fp8`): e4m3 with one fp32 scale per output channel.

Stored as `X.weight` float8_e4m3fn [rows, cols] + `X.scale` fp32 [rows] (w ~= q * scale[:, None],
scale = the row's amax / 448, e4m3's largest finite value), a quarter of fp32's bytes, half of
bf16's: what lets a 70B model fit one 141 GB GPU.

The matmul quantises each activation row to e4m3 on the fly (its own amax / 448, so a row's
numbers never depend on the other rows) and multiplies the 8-bit operands with fp32 sums:
- on GPUs with FP8 tensor cores and rowwise scaling (compute capability 9.0 and up: Hopper,
  Blackwell) through `torch._scaled_mm` (cuBLASLt / CUTLASS);
- elsewhere (CPU, older GPUs) emulated with the same arithmetic: both operands' e4m3 values
  widened exactly to the compute dtype, one dense matmul (row-stable on CPU: `row_stable_mm`),
  then the two scales. This gives FP8's numbers, not its speed: on a CPU int8 is the fast
  weight format (kernels/qmatmul.cpp), so fp8 there is for checking results, and says so once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llamaserve.model.cpu_linear import row_stable_mm

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Compute dtypes fp8 layers run in: _scaled_mm's rowwise-scaled kernels write bf16 only, and
# fp16's range (65504) would not hold every product of two scaled rows anyway.
FP8_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
# _scaled_mm wants both inner and output widths in multiples of 16.
SCALED_MM_MULTIPLE = 16
_warned_emulated = False


def check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_COMPUTE_DTYPES:
        raise ValueError(f"--quantize fp8 computes in bfloat16 or float32, not {str(dtype).removeprefix('torch.')}; "
                         "use --dtype bfloat16 (or auto)")


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [rows, cols], fp32 scale [rows]) with w ~= q * scale[:, None]; each row's largest
    magnitude maps to 448 exactly."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1) / FP8_MAX
    # An all-zero row would divide by zero; any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Clamped: e4m3fn has no infinity, and a value rounded past 448 would become NaN.
    q = (w32 / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] as e4m3 [M, K] and fp32 scales [M, 1], one per row (rowwise: a row's
    result depends on nothing but the row)."""
    q, scale = quantize_fp8(x)
    return q, scale.unsqueeze(-1)


def scaled_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T can run on FP8 tensor cores with rowwise scales (see the module doc)."""
    return (
        x.device.type == "cuda"
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and x.shape[-1] % SCALED_MM_MULTIPLE == 0
        and weight.shape[0] % SCALED_MM_MULTIPLE == 0
    )


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in], scale [out])^T in x's dtype, activations quantised
    per row to e4m3 (on FP8 tensor cores where `scaled_mm_applies`, else emulated)."""
    flat = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_rows(flat)
    if scaled_mm_applies(x, weight):
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1).float(),
                               out_dtype=torch.bfloat16)
    else:
        out = emulated_mm(xq, x_scale, weight, scale, x.dtype)
    return out.to(x.dtype).contiguous().view(*x.shape[:-1], -1)


def emulated_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """_scaled_mm's arithmetic on plain matmuls: e4m3 values widen exactly to fp32 and bf16, and
    their products (8 significant bits) are exact in fp32, so only the sums' order differs."""
    _warn_emulated(xq.device)
    a, b = xq.to(dtype), weight.to(dtype)
    out = row_stable_mm(a, b)
    out = F.linear(a, b) if out is None else out
    return out * (x_scale * scale.view(1, -1)).to(dtype)


class FusedFp8:
    """Same-input fp8 layers (q/k/v; w1/w3) as one matmul: the activations are quantised once
    and the weights read in one call instead of three or two (on a GPU, each quantisation is a
    handful of small kernels, each call a launch: about 1,400 fewer per 70B step)."""

    def __init__(self, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        self.sizes = [w.shape[0] for w in weights]
        self.weight = torch.cat(weights)
        self.scale = torch.cat(scales)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side in one tensor, unsplit."""
        return fp8_linear(x, self.weight, self.scale)


def _warn_emulated(device: torch.device) -> None:
    global _warned_emulated
    if not _warned_emulated:  # once per process
        _warned_emulated = True
        log.warning("fp8 weights on %s are emulated (dequantised for each matmul): FP8's numbers, not its speed; "
                    "FP8 matmuls need a GPU of compute capability 9.0 or later (int8 is the fast CPU format)",
                    "this CPU" if device.type == "cpu" else f"{device} (no rowwise-scaled FP8)")
