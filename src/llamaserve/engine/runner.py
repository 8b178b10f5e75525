"""The only bridge between scheduling and the model: owns the KV cache, builds the tensors.

Batch shapes are chosen for reproducibility. Matrix-multiply libraries pick different kernels
(with different rounding) for different row counts, but on the CPU and GPU builds we use, all
row counts from 16 up give each row bit-identical results. So every decode call is padded to at
least `min_decode_rows` rows; padding rows write into a spare scratch slot (index `max_users`)
and their logits are dropped. A prefill always runs one request alone, so it is reproducible
by construction. Together with the batch-invariant attention of the model
(`kv_cache.plan_attention`), a request's logits do not depend on who else is decoding.
"""

from __future__ import annotations

import torch

# Row count from which matmul rows are bit-identical whatever the batch size (measured for
# torch CPU F.linear). 1 turns padding off (fastest for one user, not reproducible across
# batch sizes).
MIN_DECODE_ROWS = 16


class ModelRunner:
    def __init__(self, model, max_users: int, max_seq_len: int, min_decode_rows: int = MIN_DECODE_ROWS) -> None:
        if min_decode_rows < 1:
            raise ValueError(f"min_decode_rows must be >= 1, got {min_decode_rows}")
        self.model = model
        self.max_users = max_users
        self.max_seq_len = max_seq_len
        self.min_decode_rows = min_decode_rows
        self.scratch_slot = max_users
        self.cache = model.new_cache(max_users + 1, max_seq_len)
        self.device = model.device
        self.vocab_size = model.args.vocab_size

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        """Feed prompt tokens at positions start_pos.. of `slot`; logits [1, V] of the last one."""
        tokens = self._long(token_ids).view(1, -1)  # [1, T]
        return self.model(tokens, self._long([start_pos]), self._long([slot]), self.cache)

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row, each at its own position and slot; logits [n, V] (padding dropped)."""
        n = len(slots)
        pad = max(0, self.min_decode_rows - n)
        if pad:
            slots = slots + [self.scratch_slot] * pad
            token_ids = token_ids + [0] * pad
            positions = positions + [0] * pad
        tokens = self._long(token_ids).view(-1, 1)  # [B, 1]
        logits = self.model(tokens, self._long(positions), self._long(slots), self.cache)
        return logits[:n] if pad else logits
