"""Arg-max and top-k over long rows, two levels deep (chunk maxima first), exact values."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def chunk_size(vocab: int) -> int:
    """A divisor of the vocabulary to split rows into chunks for the two-level max/top-k."""
    for c in (256, 128, 512, 64, 1024, 32):
        if vocab % c == 0 and vocab // c >= 8:
            return c
    return 0


def fast_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) (sorted, largest first) for [n, V] rows, on small k much faster.

    The k largest values lie in the k chunks with the largest maxima, so only those chunks are
    searched. Values are exact; among equal values the chosen index may differ from torch.topk
    (deterministically, from the row alone).
    """
    n, vocab = x.shape
    c = chunk_size(vocab)
    if not c or k * c * 4 > vocab:
        return torch.topk(x.contiguous(), k, dim=-1)
    if not x.is_contiguous() and x.t().is_contiguous():
        # Column-major logits: chunk maxima and candidate chunks read in place.
        chunks_t = x.t().view(vocab // c, c, n)
        _, chunk_ids = chunks_t.amax(1).t().topk(k, dim=-1)  # [n, k]
        rows = torch.arange(n, device=x.device)[:, None]
        cand = chunks_t[chunk_ids, :, rows].reshape(n, k * c)  # [n, k, c] -> [n, k*c]
    else:
        chunks = x.reshape(n, vocab // c, c)
        _, chunk_ids = chunks.amax(-1).topk(k, dim=-1)  # [n, k]
        cand = chunks.gather(1, chunk_ids[:, :, None].expand(n, k, c)).reshape(n, k * c)
    values, pos = cand.topk(k, dim=-1)
    return values, chunk_ids.gather(1, pos // c) * c + pos % c


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """First index of the row maximum of [n, V]; torch's own arg-max is slow on CPU for long rows."""
    n, vocab = x.shape
    c = chunk_size(vocab)
    if not c or x.device.type != "cpu":
        return x.argmax(-1)
    if not x.is_contiguous() and x.t().is_contiguous():
        # Column-major logits (the model's head may compute weight @ h^T): reduce over the
        # vocabulary dimension in place instead of copying 16 MB into rows first.
        chunks_t = x.t().view(vocab // c, c, n)
        chunk_ids = chunks_t.amax(1).argmax(0)  # [n] first chunk holding the maximum
        cand = chunks_t[chunk_ids, :, torch.arange(n, device=x.device)]  # [n, c]
        return chunk_ids * c + cand.argmax(-1)
    chunks = x.reshape(n, vocab // c, c)
    chunk_ids = chunks.amax(-1).argmax(-1)  # first chunk holding the maximum
    cand = chunks.gather(1, chunk_ids[:, None, None].expand(n, 1, c))[:, 0]  # [n, c]
    return chunk_ids * c + cand.argmax(-1)
