"""KV cache with one row per user slot, and the attention plan of one forward call."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

# Keys are read up to a whole bucket past the furthest position of the batch. Rows see only
# their own positions through the mask; on CPU, scaled_dot_product_attention gives a row the same
# bits whatever the masked tail length (in whole buckets of 16: the kernel's vector width shows
# through otherwise), batch size or strides (tests/test_batch_invariance.py checks it), so the
# bucket and the other rows never change a row's result. (Feeding the query heads that share a
# KV head as rows of one query block is 20% faster but loses this property: measured.)
KV_BUCKET = 16


class KVCache:
    """Per-layer key/value tensors of shape [n_slots, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_slots, n_kv_heads, max_seq_len, head_dim)
        self.keys = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeroed cache memory. Unwritten positions must be finite (masked scores multiply them by
    zero), but writing gigabytes of zeros at start-up is slow on CPU: an anonymous mapping is
    zero-filled by the kernel page by page as positions are first written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private: Python's default shared mapping is shmem, which gets no transparent huge pages.
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Decode reads every row's keys each step: huge pages spare the TLB misses, as for the
        # weights (llamaserve/__init__.py).
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)


@dataclass
class AttentionPlan:
    """Which cache rows a forward call reads and writes, and what each query may see."""

    slots: torch.Tensor  # [B] cache rows
    slot_range: tuple[int, int] | None  # (first, end) when slots are consecutive: read a view, no copy
    kv_len: int
    mask: torch.Tensor  # [B, 1, T, kv_len] bool, True where a key is visible


def plan_attention(positions: torch.Tensor, slots: torch.Tensor, max_seq_len: int) -> AttentionPlan:
    """positions: [B, T] absolute positions of the new tokens; slots: [B] cache rows."""
    furthest = int(positions.max())
    if furthest >= max_seq_len:
        raise ValueError(f"position {furthest} is beyond the cache length {max_seq_len}")
    kv_len = min(max_seq_len, (furthest // KV_BUCKET + 1) * KV_BUCKET)
    slot_list = slots.tolist()
    first = slot_list[0]
    consecutive = slot_list == list(range(first, first + len(slot_list)))
    key_pos = torch.arange(kv_len, device=positions.device)
    mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, kv_len]
    return AttentionPlan(slots, (first, first + len(slot_list)) if consecutive else None, kv_len, mask)
