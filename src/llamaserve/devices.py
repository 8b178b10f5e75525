"""The one place a device name and a dtype name become torch objects.

"auto" device: CUDA when there is one, else the CPU. "auto" dtype: bfloat16 on CUDA; on the CPU
bfloat16 where it has bf16 arithmetic and the kernels build, else float32 (see `resolve_dtype`). Every entry point (serve's engine process, LLM, the tensor-parallel
ranks, the weight loader and cache) goes through these, so the same flags mean the same thing
everywhere.
"""

from __future__ import annotations

import torch

# Spellings accepted for the three compute dtypes (flags, params, cache entries).
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": cuda if available, else cpu; anything else as torch spells it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (or alias such as bf16) as a torch dtype; no "auto" here."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on CUDA; on the CPU kernels.default_cpu_dtype (bf16 weights read by
    our kernel, fp32 activations rounded to bf16 at each matmul, where the CPU has AVX512-BF16 or
    AMX and the kernels build, else float32); otherwise `to_dtype`."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        from llamaserve.kernels import default_cpu_dtype

        return default_cpu_dtype()
    return to_dtype(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ...: how a dtype travels in specs and cache keys."""
    return str(dtype).removeprefix("torch.")
