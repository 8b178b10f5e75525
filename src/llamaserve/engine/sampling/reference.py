"""The reference sampler: the sampling rules written plainly, one row at a time, for the tests
to compare the fast paths against. Not used in serving.

Per row: penalties -> temperature -> softmax -> top-k -> top-p -> min-p -> inverse-CDF draw.
Penalties are computed element by element in the logits' dtype (so they equal the fast path's
to the bit, and so does a greedy choice); the distribution is computed in float64.
"""

from __future__ import annotations

import torch

from llamaserve.engine.request import SamplingParams


def penalize(logits: torch.Tensor, params: SamplingParams, seen: dict[int, int] | None) -> torch.Tensor:
    """A copy of one row of logits [V] with the request's penalties applied to its seen tokens
    (token -> times generated; 0 for prompt tokens)."""
    x = logits.clone()
    for token, count in (seen or {}).items():
        v = x[token]
        rep = torch.tensor(params.repetition_penalty, dtype=x.dtype)
        v = v / rep if v > 0 else v * rep  # repetition: prompt and output tokens
        presence = torch.tensor(params.presence_penalty, dtype=x.dtype) * (count > 0)
        frequency = torch.tensor(params.frequency_penalty, dtype=x.dtype) * count
        x[token] = v - presence - frequency  # presence / frequency: generated tokens only
    return x


def greedy(logits: torch.Tensor, params: SamplingParams, seen: dict[int, int] | None = None) -> int:
    """The first token of highest (penalised) logit."""
    return int(torch.argmax(penalize(logits, params, seen)))


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: dict[int, int] | None = None) -> torch.Tensor:
    """The distribution [V] (float64) a sampled request draws its next token from."""
    x = penalize(logits, params, seen).double()
    if params.temperature == 0:
        p = torch.zeros_like(x)
        p[torch.argmax(x)] = 1.0
        return p
    p = torch.softmax(x / params.temperature, dim=-1)
    if 0 < params.top_k < p.numel():  # the k most likely (ties with the k-th kept)
        kth = torch.sort(p, descending=True).values[params.top_k - 1]
        p = torch.where(p >= kth, p, 0.0)
        p = p / p.sum()
    if params.top_p < 1.0:
        # Keep a token when the tokens strictly more likely hold less than top_p of the mass.
        more_likely = torch.tensor([p[p > v].sum() for v in p.tolist()], dtype=p.dtype)
        p = torch.where(more_likely < params.top_p, p, 0.0)
    if params.min_p > 0.0:
        p = torch.where(p >= params.min_p * p.max(), p, 0.0)
    return p / p.sum()


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF over the tokens from most to least likely: the first whose cumulative
    probability exceeds u (the order the top-k path draws in; the whole-vocabulary paths walk
    token ids in order instead, the same distribution but another token for the same u)."""
    order = torch.sort(probs, descending=True, stable=True).indices
    cdf = torch.cumsum(probs[order], dim=0)
    pos = torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)
    return int(order[pos.clamp(max=probs.numel() - 1)])


def sample(logits: torch.Tensor, params: SamplingParams, u: float, seen: dict[int, int] | None = None) -> int:
    """One token for one row with the uniform u (a greedy request ignores it)."""
    if params.temperature == 0:
        return greedy(logits, params, seen)
    return draw(probabilities(logits, params, seen), u)
