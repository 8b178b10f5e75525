"""The only bridge between scheduling and the model: owns the KV cache, builds the tensors.

Batch shapes are chosen for reproducibility. Matrix-multiply libraries pick different kernels
(with different rounding) for different row counts. On CPU the model's linear layers go through
oneDNN (packed fp32 weights, or plain ones: model/llama.py), which gives each row the same bits
for any batch of 2 rows or more, so decode calls have at least 2 rows there. Which row counts
share a kernel differs between CPUs (MKL's sgemm changed a row's bits at 4 rows on AMD Zen 4 and
at 16 on Intel AMX), so the runner checks its model's path once per process
(model/row_stability.py) and, where a row count changes the bits, makes every decode call cover
every slot: one row count. On CUDA every decode call covers
all slots, one constant row count: cuBLAS picks its kernel by the row count, and on an H200 a
row's bf16 bits changed between 24 and 25 rows of the 8B model's 4096 x 4096 layers, and between
16 and 17 rows of most fp32 layers (benchmarks/cuda_invariance.py; the CUDA section of
benchmarks/README.md). The extra rows cost 1-3% at one user there (steps are bound by kernel
launches, not by the rows). Logits rows of idle slots are dropped.

Attention on CUDA: torch's kernels for the model's call (cuDNN's in bf16/fp16, the math one in
fp32) give a row different bits for different key lengths (on an H200: past 128 keys with cuDNN,
at about two thirds of the 16-key buckets with the math kernel), so there every decode call also
reads the keys up to the cache's end, one key length for every call: the cache gets one spare
slot, never scheduled, whose dummy row sits at the last position. That costs attention over the
whole cache each step (measured -5% at 32 users on an 8B-shaped model with a 4096-token cache,
within the run-to-run spread), and makes every decode call the same shape.

A prefill always runs one request alone, so it is reproducible by construction. Together with
the batch-invariant attention of the model, a request's logits do not depend on who else decodes.

A decode call covers the consecutive slots 0..R-1 (R >= min_decode_rows), so the model reads
the cache as a view instead of gathering rows. Slots in that range that are not decoding this
step (free, or mid-way through a chunked prefill) are fed a dummy token at the next position
their owner has not written yet: whoever uses the slot writes that position before reading it,
so the dummy write is harmless.
"""

from __future__ import annotations

import torch

from llamaserve.model.llama import CPU_ROW_STABLE_MIN
from llamaserve.model.row_stability import model_rows_stable

# Fewest decode rows off the CPU path (the cache has at least this many slots there);
# min_decode_rows=1 turns padding off (not reproducible).
MIN_DECODE_ROWS = 16


def default_min_decode_rows(device: torch.device, n_users: int, rows_stable: bool = True) -> int:
    """`rows_stable`: whether the model's CPU linear path gives a row the same bits for any row
    count from CPU_ROW_STABLE_MIN up (model/row_stability.py); without it every call gets every slot."""
    if torch.device(device).type == "cpu":
        return CPU_ROW_STABLE_MIN if rows_stable else max(CPU_ROW_STABLE_MIN, n_users)
    return max(MIN_DECODE_ROWS, n_users)  # every slot, every step: one row count


def reads_whole_cache(device: torch.device) -> bool:
    """Whether decode calls read keys up to the cache's end to stay batch-invariant (see above)."""
    return torch.device(device).type == "cuda"


class ModelRunner:
    def __init__(self, model, max_users: int, max_seq_len: int, min_decode_rows: int | None = None) -> None:
        if hasattr(model, "pack_weights"):
            model.pack_weights()
        if hasattr(model, "prepare_decode"):
            model.prepare_decode()  # builds the CPU decode kernels now, not in the first request
        # A spare slot only where the runner chooses the padding (min_decode_rows=1 gives up reproducibility).
        spare = min_decode_rows is None and reads_whole_cache(model.device)
        if min_decode_rows is None:
            cpu = torch.device(model.device).type == "cpu"
            stable = not cpu or model_rows_stable(model, max(max_users, CPU_ROW_STABLE_MIN))
            min_decode_rows = default_min_decode_rows(model.device, max_users, stable)
        if min_decode_rows < 1:
            raise ValueError(f"min_decode_rows must be >= 1, got {min_decode_rows}")
        self.model = model
        self.max_users = max_users
        self.max_seq_len = max_seq_len
        self.n_slots = max(max_users, min_decode_rows) + spare
        # The last slot, whose dummy row at the last position makes every decode call read all keys.
        self.spare_slot = self.n_slots - 1 if spare else None
        self.min_decode_rows = self.n_slots if spare else min_decode_rows
        self.cache = model.new_cache(self.n_slots, max_seq_len)
        # Per slot: the next position nobody has written yet for the slot's current owner.
        self._next_unwritten = [0] * self.n_slots
        self.device = model.device
        self.vocab_size = model.args.vocab_size

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prefill(self, slot: int, token_ids: list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Feed prompt tokens at positions start_pos.. of `slot`; logits [1, V] of the last one,
        or [T, V] of every one with `all_logits` (prompt scoring)."""
        tokens = self._long(token_ids).view(1, -1)  # [1, T]
        self._next_unwritten[slot] = start_pos + len(token_ids)
        logits = self.model(tokens, self._long([start_pos]), self._long([slot]), self.cache, all_logits=all_logits)
        return logits[0] if all_logits else logits

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row, each at its own position and slot; logits [n, V] in `slots` order."""
        rows = max(self.min_decode_rows, max(slots) + 1)
        row_tokens = [0] * rows
        row_positions = [min(p, self.max_seq_len - 1) for p in self._next_unwritten[:rows]]
        if self.spare_slot is not None:
            row_positions[self.spare_slot] = self.max_seq_len - 1
        for slot, token, position in zip(slots, token_ids, positions):
            row_tokens[slot] = token
            row_positions[slot] = position
            self._next_unwritten[slot] = position + 1
        tokens = self._long(row_tokens).view(-1, 1)  # [R, 1]
        logits = self.model(tokens, self._long(row_positions), torch.arange(rows, device=self.device), self.cache)
        if slots == list(range(rows)):
            return logits
        if logits.is_contiguous() and slots == list(range(len(slots))):
            return logits[: len(slots)]  # the leading rows: a view, where a gather copies (1 user: 0.1 ms)
        picked = self._long(slots)
        if not logits.is_contiguous() and logits.t().is_contiguous():
            # Column-major logits (the unpacked CPU head computes weight @ h^T): pick columns of the transpose,
            # five times cheaper than gathering strided rows, and the sampler reads that layout.
            return logits.t().index_select(1, picked).t()
        return logits[picked]
