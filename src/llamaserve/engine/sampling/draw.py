"""Inverse-CDF draws (one uniform per draw) and the top-p / min-p mask of sorted candidates."""

from __future__ import annotations

import torch

from llamaserve.engine.request import SamplingParams
from llamaserve.engine.sampling.reduce import chunk_size


def keep_mask(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-p then min-p on probabilities sorted largest first: [r, K] bool, always a prefix."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    top_p = [p.top_p for p in params]
    if any(tp < 1.0 for tp in top_p):
        # A row without top-p gets an infinite threshold rather than p=1, which rounding in
        # the cumulative sum could turn into dropping the tail.
        thr = torch.tensor([tp if tp < 1.0 else float("inf") for tp in top_p], device=probs.device)[:, None]
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        keep &= before < thr
    min_p = [p.min_p for p in params]
    if any(mp > 0 for mp in min_p):
        mp_t = torch.tensor(min_p, device=probs.device)[:, None]
        keep &= probs >= mp_t * probs[:, :1]
    return keep


def pick(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[r, K] first column whose cdf exceeds each target: one with weight where the row has any."""
    # Rounding can put a target (u * total) at or above the row's total, past every column: a
    # target capped just below the total lands on the column where the cdf reaches the total,
    # which has weight. Elementwise, so nothing is read back to the host (the device sampler
    # runs this in a compiled or captured step); the clamp keeps rows without weight in range.
    top = cdf[:, -1:]
    target = torch.minimum(target, torch.nextafter(top, torch.full_like(top, float("-inf"))))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)


def draw(weights: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draw of one column per row of non-negative `weights` [r, K], with a uniform
    u [r, 1] per row; `ids` maps columns to token ids (None: the column is the token id)."""
    cdf = torch.cumsum(weights, dim=-1)
    pos = pick(cdf, u.to(cdf.dtype) * cdf[:, -1:])
    chosen = pos if ids is None else ids.gather(1, pos)
    return chosen[:, 0]


def draw_chunked(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over whole-vocabulary weights [r, V]: pick a chunk of the vocabulary by
    its mass, then a token inside it (two short cumulative sums instead of one long one)."""
    r, vocab = weights.shape
    c = chunk_size(vocab)
    if not c:
        return draw(weights, u)
    chunks = weights.reshape(r, vocab // c, c)
    mass = chunks.sum(-1)  # [r, n_chunks]
    cdf = torch.cumsum(mass, dim=-1)
    target = u.to(cdf.dtype) * cdf[:, -1:]
    ci = pick(cdf, target)  # [r, 1]
    below = torch.where(ci > 0, cdf.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
    inner_u = ((target - below) / mass.gather(1, ci)).clamp(0.0, 1.0)
    inner = chunks.gather(1, ci[:, :, None].expand(r, 1, c))[:, 0]  # [r, c]
    return ci[:, 0] * c + draw(inner, inner_u)
