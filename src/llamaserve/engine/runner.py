"""The only bridge between scheduling and the model: owns the KV cache, builds the tensors.

Batch shapes are chosen for reproducibility. Matrix-multiply libraries pick different kernels
(with different rounding) for different row counts. On CPU the model's linear layers go through
oneDNN (packed fp32 weights, or plain ones: model/cpu_linear.py), which gives each row the same bits
for any batch of 2 rows or more, so decode calls have at least 2 rows there. Which row counts
share a kernel differs between CPUs (MKL's sgemm changed a row's bits at 4 rows on AMD Zen 4 and
at 16 on Intel AMX), so the runner checks its model's path once per process
(model/row_stability.py) and, where a row count changes the bits, makes every decode call cover
every slot: one row count. On CUDA every decode call covers
all slots, one constant row count: cuBLAS picks its kernel by the row count, and on an H200 a
row's bf16 bits changed between 24 and 25 rows of the 8B model's 4096 x 4096 layers, and between
16 and 17 rows of most fp32 layers (benchmarks/cuda_invariance.py; the CUDA section of
benchmarks/README.md). The extra rows cost 1-3% at one user there (steps are bound by kernel
launches, not by the rows). Logits of padding rows are dropped.

Attention on CUDA: torch's kernels for the model's call (cuDNN's in bf16/fp16, the math one in
fp32) give a row different bits for different key lengths (on an H200: past 128 keys with cuDNN,
at about two thirds of the 16-key buckets with the math kernel), so there every decode call also
reads the keys up to the cache's end, one key length for every call: one padding row of every
decode call (which then has max_users + 1 rows or more) sits at the last position. That costs attention over the
whole cache each step (measured -5% at 32 users on an 8B-shaped model with a 4096-token cache,
within the run-to-run spread), and makes every decode call the same shape.

A prefill always runs one request alone, so it is reproducible by construction. Together with
the batch-invariant attention of the model, a request's logits do not depend on who else decodes.

The cache is a pool of blocks (model/kv_cache.py) with one block table per slot; the block
manager (engine/block_manager.py, driven by the scheduler) decides which blocks a sequence
holds, and the runner copies that into the slot's table before the call that needs it. A decode
call's rows are the decoding sequences in the order given, then padding rows up to the row
count: padding rows read the padding slot, whose table holds only the null block, so they
write and read nothing of anyone's. On CUDA one padding row sits at the last position, so the
call reads keys up to the cache's end.
"""

from __future__ import annotations

import torch

from llamaserve.model.cuda_graphs import captured_decode, graphs_apply
from llamaserve.model.kv_cache import BLOCK_SIZE
from llamaserve.model.serving import ServingPlan

# Fewest decode rows off the CPU path (the cache has at least this many slots there);
# min_decode_rows=1 turns padding off (not reproducible).
MIN_DECODE_ROWS = 16


def default_min_decode_rows(device: torch.device, n_users: int, plan: ServingPlan = ServingPlan()) -> int:
    """On CPU `plan.stable_from_rows`, where the model's linear path gives a row the same bits for
    any row count from there up to n_users (`plan.rows_stable`, model/row_stability.py); without
    that every call gets every slot."""
    if torch.device(device).type == "cpu":
        low = plan.stable_from_rows
        return low if plan.rows_stable(max(n_users, low)) else max(low, n_users)
    return max(MIN_DECODE_ROWS, n_users)  # every slot, every step: one row count


def reads_whole_cache(device: torch.device) -> bool:
    """Whether decode calls read keys up to the cache's end to stay batch-invariant (see above)."""
    return torch.device(device).type == "cuda"


class ModelRunner:
    def __init__(self, model, max_users: int, max_seq_len: int, min_decode_rows: int | None = None,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE) -> None:
        """num_blocks: size of the block pool, whose blocks `assign` gives to slots (None: each
        slot owns max_seq_len positions)."""
        # Packs the weights and builds the CPU decode kernels now, not in the first request.
        self.plan = model.prepare_for_serving()
        # A last-position padding row only where the runner chooses the padding (min_decode_rows=1
        # gives up reproducibility).
        self.whole_cache = min_decode_rows is None and reads_whole_cache(model.device)
        if min_decode_rows is None and self.plan.rows_independent:
            min_decode_rows = 1  # every matmul on kernels/qmatmul.cpp: a row's bits from one row up
        if min_decode_rows is None:
            min_decode_rows = default_min_decode_rows(model.device, max_users, self.plan)
        if min_decode_rows < 1:
            raise ValueError(f"min_decode_rows must be >= 1, got {min_decode_rows}")
        self.model = model
        self.max_users = max_users
        self.max_seq_len = max_seq_len
        self.n_slots = max_users
        self.min_decode_rows = max(min_decode_rows, max_users + 1) if self.whole_cache else min_decode_rows
        # Without a pool size each slot owns max_seq_len positions (runner used without a scheduler).
        self.cache = model.new_cache(self.n_slots, max_seq_len, num_blocks=num_blocks, block_size=block_size)
        self.block_size = block_size
        self.padding_slot = self.cache.tables.padding_slot
        # Per slot: the block list last copied into its table, and how much of it.
        self._synced: list[tuple[list[int] | None, int]] = [(None, 0)] * self.n_slots
        self.device = model.device
        self.vocab_size = model.args.vocab_size
        # Every decode call has min_decode_rows rows where the runner reads the whole cache: on
        # CUDA they replay one captured graph (model/cuda_graphs.py).
        self.captured = (captured_decode(model, self.cache, self.min_decode_rows)
                         if graphs_apply(model, self.whole_cache) else None)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def assign(self, slot: int, blocks: list[int]) -> None:
        """Make `slot`'s table hold `blocks` (a sequence's growing block list: a list seen before
        only has its new tail copied)."""
        seen, n = self._synced[slot]
        if seen is blocks:
            if len(blocks) > n:
                self.cache.tables.assign(slot, n, blocks[n:])
        else:
            self.cache.tables.assign(slot, 0, blocks)
        self._synced[slot] = (blocks, len(blocks))

    def prefill(self, slot: int, token_ids: list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Feed prompt tokens at positions start_pos.. of `slot`; logits [1, V] of the last one,
        or [T, V] of every one with `all_logits` (prompt scoring)."""
        tokens = self._long(token_ids).view(1, -1)  # [1, T]
        logits = self.model(tokens, self._long([start_pos]), self._long([slot]), self.cache, all_logits=all_logits)
        return logits[0] if all_logits else logits

    def prefill_many(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prompt chunks of one length (at least two tokens) of several slots in one call: one
        pass over the weights instead of one per chunk; logits [n, V] of each chunk's last token.
        A row's numbers are those of its chunk alone (rows of a linear call from two up, and each
        batch row's attention, are independent of the others: tests/test_batch_invariance.py)."""
        if len({len(c) for c in chunks}) != 1 or len(chunks[0]) < 2:
            raise ValueError("prefill_many takes chunks of one length, at least 2 tokens each")
        tokens = self._long([t for chunk in chunks for t in chunk]).view(len(chunks), -1)
        return self.model(tokens, self._long(starts), self._long(slots), self.cache)

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row, each at its own position and slot; logits [n, V] in `slots` order."""
        n = len(slots)
        if positions and max(positions) >= self.max_seq_len:  # here, where no device sync is needed
            raise ValueError(f"position {max(positions)} is beyond the cache length {self.max_seq_len}")
        rows = max(self.min_decode_rows, n)
        padding = rows - n
        row_slots = slots + [self.padding_slot] * padding
        row_positions = positions + [0] * padding
        if self.whole_cache:
            row_positions[-1] = self.max_seq_len - 1
        row_tokens = token_ids + [0] * padding
        if self.captured is not None and rows == self.captured.rows:
            # Host tensors: the captured step copies them into its static device buffers (and a
            # tensor-parallel leader sends them to the other ranks without a device round trip).
            host = [torch.tensor(v, dtype=torch.long) for v in (row_tokens, row_positions, row_slots)]
            logits = self.captured(host[0].view(-1, 1), host[1], host[2])
        else:
            tokens = self._long(row_tokens).view(-1, 1)  # [R, 1]
            logits = self.model(tokens, self._long(row_positions), self._long(row_slots), self.cache)
        return logits if n == rows else logits[:n]  # the leading rows: a view, where a gather copies
