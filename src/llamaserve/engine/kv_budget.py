"""How many KV blocks the pool gets: from `--kv-cache-memory` GiB, or on a GPU, from a fraction
of its memory (vLLM's `--gpu-memory-utilization`), so a server uses the card it is given without
the user working out bytes per token.

A GPU's budget is `fraction x total - what is in use now - a reserve for the activations of the
largest forward call` (measured after the weights are loaded, before the pool exists). The
reserve is an estimate, not a profile run: the logits of the widest call in fp32, three times
over (the head's output, the sampler's work copy, the logprobs), plus a fixed margin for the
layers' intermediate tensors and the CUDA context's own growth.
"""

from __future__ import annotations

import gc

import torch

from llamaserve.engine.args import DEFAULT_GPU_MEMORY_UTILIZATION
from llamaserve.model.kv_cache import BLOCK_SIZE

__all__ = ["DEFAULT_GPU_MEMORY_UTILIZATION", "activation_reserve_bytes", "cuda_kv_budget_gib", "gpu_kv_budget_gib",
           "kv_pool_blocks"]
ACTIVATION_MARGIN_BYTES = 1 << 30


def kv_pool_blocks(memory_gib: float | None, bytes_per_token: int, block_size: int = BLOCK_SIZE) -> int | None:
    """Blocks of a KV pool of `memory_gib` GiB (None: the scheduler's default size)."""
    if memory_gib is None:
        return None
    if not memory_gib > 0:
        raise ValueError(f"kv_cache_memory must be a positive number of GiB, got {memory_gib!r}")
    if bytes_per_token <= 0:
        raise ValueError("kv_cache_memory needs a model that says its KV bytes per token (kv_bytes_per_token)")
    blocks = int(memory_gib * 2**30) // max(1, bytes_per_token * block_size)
    if blocks < 1:
        raise ValueError(f"kv_cache_memory {memory_gib} GiB holds no block of {block_size} tokens "
                         f"({bytes_per_token * block_size} bytes each)")
    return blocks


def activation_reserve_bytes(widest_call_rows: int, vocab_size: int) -> int:
    return 3 * widest_call_rows * vocab_size * 4 + ACTIVATION_MARGIN_BYTES


def gpu_kv_budget_gib(fraction: float, free_bytes: int, total_bytes: int, reserve_bytes: int) -> float:
    """GiB left for the KV pool when the process may use `fraction` of the device's memory.
    ValueError (saying how much is missing) when nothing would be left."""
    if not 0 < fraction <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction!r}")
    in_use = total_bytes - free_bytes
    budget = fraction * total_bytes - in_use - reserve_bytes
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization {fraction:g} of {total_bytes / 2**30:.1f} GiB leaves no memory for the KV cache: "
            f"{in_use / 2**30:.1f} GiB is in use (weights, other processes) and {reserve_bytes / 2**30:.1f} GiB is "
            "kept for activations; raise --gpu-memory-utilization, or give --kv-cache-memory GIB explicitly")
    return budget / 2**30


def cuda_kv_budget_gib(device: torch.device, fraction: float, reserve_bytes: int) -> float:
    """gpu_kv_budget_gib for a CUDA device as it is now (after the weights are loaded).

    Memory torch's caching allocator holds but no tensor uses counts as free: the device reports
    it in use, yet this process's pool can take it. An engine built after another one was dropped
    (benchmarks, tests: one engine after the other in a process) would otherwise find the earlier
    pool's memory "in use" and no room left. Unreachable engines are collected first, so their
    pools are back in the allocator's cache."""
    gc.collect()
    torch.cuda.synchronize(device)
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return gpu_kv_budget_gib(fraction, free_bytes + cached_unused, total_bytes, reserve_bytes)
