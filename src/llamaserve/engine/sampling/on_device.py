"""The device sampler: every row of a batch in one sequence of tensor operations, with no host
synchronisation and no work per row in Python (issue 14: on a GPU the host sampler's grouping,
per-row uniforms and rejection loop cost more than the step's arithmetic).

Per row, the rules of the package (penalties, applied before, by the Sampler) -> temperature ->
top-k -> top-p over what is left -> min-p -> one draw:
- weights e = exp(x / T - max): the top token's weight is exactly 1;
- min-p keeps e >= min_p (the ratio to the top token, as the reference's p >= min_p * p_max);
- top-k keeps weights at or above the k-th (ties kept): the k-th found by torch.topk, or by the
  sort where some row has top-p;
- top-p, where some row of the batch asks for it, on the whole row sorted by weight: keeps a
  weight when the weights strictly above it, renormalised over the top-k set, hold less than
  top_p (ties kept);
- one inverse-CDF draw over the kept weights in token order (draw.draw_chunked), with the
  request's counter-based uniform (counter_uniforms.py); greedy rows (T = 0) take the arg-max.

Row independence: every operation is elementwise or along a row, and a row's kept weights are
the same bits whatever the batch needs (the k-th weight is an exact selection by either route; a
row without top-k/top-p keeps every weight in the sorted pass), so the others change no row's
token. On a GPU torch picks a reduction's strategy by the tensor's shape, so the sampler runs
every call on `rows` rows (padding rows greedy on zeros): one shape, as the runner's decode
calls have.

The function `device_tokens` takes tensors and Python flags only, so it compiles whole
(tests/test_device_sampler.py) and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from llamaserve.engine.sampling.counter_uniforms import uniforms
from llamaserve.engine.sampling.draw import draw_chunked


def kept_weights(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                 rank_filter: int) -> torch.Tensor:
    """[n, V] float32 weights proportional to each row's sampling distribution, zero where a
    token is filtered out; scaled = logits / T, top_k [n] (0: off), top_p [n], min_p [n].
    rank_filter (a Python int, so the work is fixed before the call): 0 when no row has top-k or
    top-p; SORT when some row has top-p (the whole row sorted); else the largest top-k."""
    top = scaled.amax(-1, keepdim=True)
    e = torch.exp(scaled - top)
    # +inf logits: all the mass on them (inf - inf is NaN); NaN rows: no weight anywhere (the
    # draw then still returns a token id in range).
    e = torch.where(torch.isinf(top), (scaled == top).to(e.dtype), e)
    e = torch.nan_to_num(e, nan=0.0)
    keep = e >= min_p[:, None]
    if not rank_filter:
        return torch.where(keep, e, 0.0)
    vocab = e.shape[1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if rank_filter != SORT:
        # Top-k alone: the k-th weight is an exact selection, the same value a sort gives.
        largest = torch.topk(e, min(rank_filter, vocab), dim=-1).values
        found = largest.shape[1]
        kth = largest.gather(1, (k.clamp(max=found) - 1)[:, None])
        kth = torch.where(k[:, None] <= found, kth, 0.0)  # rows without top-k (k = V) keep all
        return torch.where(keep & (e >= kth), e, 0.0)
    se, order = torch.sort(e, dim=-1, descending=True, stable=True)
    kth = se.gather(1, (k - 1)[:, None])
    in_k = se >= kth
    pk = (se * in_k).double()
    pk = pk / pk.sum(-1, keepdim=True)
    before = torch.cumsum(pk, dim=-1) - pk
    # A weight's "strictly more likely" mass excludes its equals: the first of its run's.
    descending = se.neg().contiguous()
    first_of_run = torch.searchsorted(descending, descending, right=False)
    threshold = torch.where(top_p < 1.0, top_p.to(torch.float64), float("inf"))[:, None]
    in_p = before.gather(1, first_of_run) < threshold
    keep = keep & (e >= kth) & torch.zeros_like(keep).scatter(1, order, in_p)
    return torch.where(keep, e, 0.0)


def device_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, keys: torch.Tensor, draws: torch.Tensor, rank_filter: int) -> torch.Tensor:
    """Token ids [n] for logits [n, V] (float32, penalties applied): greedy where temperature
    is 0, else drawn with uniform number draws[i] of key keys[i] (int64)."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    weights = kept_weights(scaled, top_k, top_p, min_p, rank_filter)
    drawn = draw_chunked(weights, uniforms(keys, draws)[:, None])
    return torch.where(greedy, logits.argmax(-1), drawn)


# rank_filter's value for "sort the whole row" (top-p needs every weight's rank).
SORT = -1


def rank_filter_for(params) -> int:
    """What the batch's sampled rows need: SORT if any has top-p, else the largest top-k (0: none)."""
    sampled = [p for p in params if p.temperature > 0]
    if any(p.top_p < 1.0 for p in sampled):
        return SORT
    return max((p.top_k for p in sampled), default=0)


class DeviceDraws:
    """Runs `device_tokens` on a fixed number of rows (None: the batch's own) on the logits'
    device, from the rows' SamplingStates."""

    def __init__(self, rows: int | None = None) -> None:
        self.rows = rows
        self._logits: torch.Tensor | None = None  # the padded batch, reused

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        rows = max(self.rows or n, n)
        if rows == n and logits.dtype == torch.float32:
            return logits
        buf = self._logits
        if buf is None or buf.shape != (rows, vocab) or buf.device != logits.device:
            buf = self._logits = torch.zeros(rows, vocab, dtype=torch.float32, device=logits.device)
        buf[:n].copy_(logits)
        buf[n:].zero_()  # padding rows: greedy over zeros, token 0, dropped
        return buf

    def sample(self, logits: torch.Tensor, states: list) -> torch.Tensor:
        """Token ids [n] for logits [n, V], one row per state; advances each sampled row's draw
        counter."""
        n = logits.shape[0]
        x = self._padded(logits)
        pad = x.shape[0] - n
        params = [st.params for st in states]
        # One host-to-device copy of every row's numbers (keys are 32-bit: exact in float64).
        table = torch.tensor(
            [(p.temperature, p.top_k, p.top_p, p.min_p, st.key or 0, st.draws)
             for p, st in zip(params, states)] + [(0.0, 0, 1.0, 0.0, 0, 0)] * pad,
            dtype=torch.float64).to(x.device, non_blocking=True)
        temperature, min_p = table[:, 0].to(torch.float32), table[:, 3].to(torch.float32)
        top_k, keys, draws = (table[:, i].to(torch.long) for i in (1, 4, 5))
        top_p = table[:, 2]  # float64: compared with float64 masses
        tokens = device_tokens(x, temperature, top_k, top_p, min_p, keys, draws, rank_filter_for(params))
        for st in states:
            if st.key is not None:
                st.draws += 1
        return tokens[:n]
