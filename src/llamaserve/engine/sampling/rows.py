"""Row selection and reused buffers, shared by the sampler's paths."""

from __future__ import annotations

import torch


class Rows:
    """Index tensors on one device, and reused buffers (a fresh 16 MB tensor every step costs
    page faults)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[int, torch.Tensor] = {}  # slot -> storage

    def index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def select(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if len(rows) == x.shape[0]:
            return x
        return x[self.index(rows)]

    def buffer(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def writable(self, logits: torch.Tensor, members: list[int]) -> torch.Tensor:
        """The member rows as a contiguous [n, V] tensor that may be written over: the logits
        themselves when they are row-major and hold exactly those rows (the engine's case,
        logits of this call's own), else a copy in a reused buffer (slot 0)."""
        big_n, vocab = logits.shape
        n = len(members)
        if logits.is_contiguous() and members == list(range(big_n)):
            return logits
        x = self.buffer(0, (n, vocab), logits)
        if n == big_n:
            x.copy_(logits)  # a column-major head's logits: one transposing copy
        elif logits.t().is_contiguous():
            x.copy_(logits.t().index_select(1, self.index(members)).t())
        else:
            torch.index_select(logits, 0, self.index(members), out=x)
        return x
