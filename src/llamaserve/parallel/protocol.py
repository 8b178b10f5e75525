"""What rank 0 tells the other ranks before each model call (broadcast over the control group).

A step is a fixed-size int64 header, then (for a forward) one int64 payload holding the batch:
tokens [B*T], start_pos [B], slots [B]. The control group is gloo on every device, so the
header never needs a device copy; it has a long timeout because an idle server sends nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

OP_NEW_CACHE = 1  # [op, cache_id, n_slots, max_seq_len]
OP_FREE_CACHE = 2  # [op, cache_id]
OP_FORWARD = 3  # [op, cache_id, B, T, all_logits] + payload
OP_STOP = 4  # [op]
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


def send_batch(ctrl, tokens: torch.Tensor, start_pos: torch.Tensor, slots: torch.Tensor) -> None:
    payload = torch.cat([tokens.reshape(-1), start_pos.reshape(-1), slots.reshape(-1)]).to("cpu", torch.long)
    _broadcast(ctrl, payload)


def receive_batch(ctrl, bsz: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload = torch.empty(bsz * seqlen + 2 * bsz, dtype=torch.long)
    _broadcast(ctrl, payload)
    n = bsz * seqlen
    return payload[:n].view(bsz, seqlen), payload[n : n + bsz], payload[n + bsz :]
