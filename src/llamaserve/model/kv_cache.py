"""KV cache with one row per user slot, and the attention plan of one forward call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Keys are read in whole buckets so that a row's attention shape depends only on its own
# position, never on the other rows of the batch: that keeps results batch-invariant.
KV_BUCKET = 128


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
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class AttentionGroup:
    """Rows of the batch that attend over the same number of cached positions."""

    rows: torch.Tensor | None  # [n] row indices into the batch; None means every row
    slots: torch.Tensor  # [n] cache rows
    kv_len: int
    mask: torch.Tensor  # [n, 1, T, kv_len] bool, True where a key is visible


def plan_attention(positions: torch.Tensor, slots: torch.Tensor, max_seq_len: int) -> list[AttentionGroup]:
    """Group rows by the bucketed length of the keys they need.

    positions: [B, T] absolute positions of the new tokens; slots: [B] cache rows.
    """
    last = positions[:, -1].tolist()
    buckets = [min(max_seq_len, ((p + KV_BUCKET) // KV_BUCKET) * KV_BUCKET) for p in last]
    groups = []
    for kv_len in sorted(set(buckets)):
        members = [i for i, b in enumerate(buckets) if b == kv_len]
        rows = None if len(members) == len(buckets) else torch.tensor(members, device=positions.device)
        pos = positions if rows is None else positions[rows]
        key_pos = torch.arange(kv_len, device=positions.device)
        mask = (key_pos[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # [n, 1, T, kv_len]
        groups.append(AttentionGroup(rows, slots if rows is None else slots[rows], kv_len, mask))
    return groups
