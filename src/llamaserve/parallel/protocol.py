"""What rank 0 tells the other ranks before each model call (broadcast over the control group).

A step is a fixed-size int64 header, then (for a forward) one int64 payload holding the batch:
tokens [B*T], start_pos [B], slots [B], and the block-table rows of those slots [B, max_blocks]
(rank 0's block manager decides them; every rank's cache must address the same blocks). The control group is gloo on every device, so the
header never needs a device copy; it has a long timeout because an idle server sends nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

OP_NEW_CACHE = 1  # [op, cache_id, n_slots, max_seq_len, num_blocks (0: one row per slot), block_size]
OP_FREE_CACHE = 2  # [op, cache_id]
OP_FORWARD = 3  # [op, cache_id, B, T, all_logits] + payload
OP_STOP = 4  # [op]
# One decode step on every rank's captured step for the cache (model/cuda_graphs.py), created
# at the first such command: [op, cache_id, rows] + payload (T = 1).
OP_DECODE_STEP = 5
HEADER_LEN = 8


def _broadcast(ctrl, t: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    ctrl.broadcast([t], opts).wait()


def send(ctrl, *fields: int) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    header[: len(fields)] = torch.tensor(fields, dtype=torch.long)
    _broadcast(ctrl, header)


def receive(ctrl) -> list[int]:
    header = torch.empty(HEADER_LEN, dtype=torch.long)
    _broadcast(ctrl, header)
    return header.tolist()


def send_batch(ctrl, tokens: torch.Tensor, start_pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor) -> None:
    parts = [tokens.reshape(-1), start_pos.reshape(-1), slots.reshape(-1), tables.reshape(-1)]
    _broadcast(ctrl, torch.cat([p.to("cpu", torch.long) for p in parts]))


def receive_batch(ctrl, bsz: int, seqlen: int, max_blocks: int):
    """tokens [B, T], start_pos [B], slots [B], block-table rows [B, max_blocks]."""
    payload = torch.empty(bsz * seqlen + 2 * bsz + bsz * max_blocks, dtype=torch.long)
    _broadcast(ctrl, payload)
    n = bsz * seqlen
    tables = payload[n + 2 * bsz :].view(bsz, max_blocks)
    return payload[:n].view(bsz, seqlen), payload[n : n + bsz], payload[n + bsz : n + 2 * bsz], tables
