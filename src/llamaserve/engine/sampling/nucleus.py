"""Top-p / min-p for whole-vocabulary rows: the uniforms a row may consume, and the exact
whole-row search for the rare row whose draws are all refused."""

from __future__ import annotations

import torch

from llamaserve.engine.request import SamplingParams
from llamaserve.engine.sampling.draw import draw_chunked
from llamaserve.engine.sampling.rows import Rows

# Draws a top-p / min-p row without top-k makes per token (all drawn at once, used in order
# until one is kept); refused every time, the row takes the exact whole-row search
# (`nucleus_weights`, milliseconds per row). A draw is kept with probability at least top_p
# (the nucleus holds that much mass), so with top_p 0.9 one row in 10^4 gets there.
NUCLEUS_DRAWS = 4

# Value bins of the exact top-p search over a whole row (weights relative to the row's max).
NUCLEUS_BINS = 4096


def nucleus_uniforms(members: list[int], states, params) -> tuple[list[bool], list[list[float]]]:
    """Which rows have a top-p / min-p test, and every uniform each row may need, drawn at once:
    one for a plain row, NUCLEUS_DRAWS for a tested row (used in order until a draw is kept).
    Only those are consumed from a row's stream; the rest of the [n][draws] table is padding."""
    checked = [p.top_p < 1.0 or p.min_p > 0.0 for p in params]
    draws = NUCLEUS_DRAWS if any(checked) else 1
    return checked, [
        [states[i].rng.random() for _ in range(draws if chk else 1)] + [0.5] * (draws - (draws if chk else 1))
        for i, chk in zip(members, checked)
    ]


def exact_nucleus_draw(e: torch.Tensor, rows: list[int], members, states, params, idx: Rows) -> torch.Tensor:
    """For rows of weights e [n, V] refused every time (a tiny top-p on flat logits, a large
    min-p): the exact whole-row nucleus search, and one more uniform of each row's stream."""
    weights = nucleus_weights(e[idx.index(rows)], [params[j] for j in rows])
    u = torch.tensor([states[members[j]].rng.random() for j in rows], dtype=torch.float64, device=e.device)
    return draw_chunked(weights, u[:, None])


def nucleus_weights(e: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-p / min-p over whole rows without sorting them: e [r, V] unnormalised probabilities.

    A token is in the nucleus when the mass of the strictly more likely tokens is below
    top_p: that is every token >= t*, the smallest value v with mass(e > v) < top_p * mass.
    A mass histogram over value bins finds the one bin where that switches; only the tokens of
    that bin are sorted. Tokens tied at t* are all kept. Masses are summed in float64. All rows
    at once, each row's numbers computed as if it were alone.
    """
    keep = torch.ones_like(e, dtype=torch.bool)
    tp = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if tp:
        keep[torch.tensor(tp, device=e.device)] = _top_p_keep(e, params, tp).to(keep.device)
    min_p = [p.min_p for p in params]
    if any(mp > 0 for mp in min_p):
        mp_t = torch.tensor(min_p, dtype=e.dtype, device=e.device)[:, None]
        keep &= e >= mp_t * e.amax(-1, keepdim=True)
    return e * keep


def _top_p_keep(e: torch.Tensor, params: list[SamplingParams], tp: list[int]) -> torch.Tensor:
    """The top-p mask of rows `tp` of e (see nucleus_weights), on the CPU."""
    # On the CPU: a GPU bincount adds weights atomically, in no fixed order.
    x = (e if len(tp) == len(params) else e[torch.tensor(tp, device=e.device)]).cpu()
    r, nb = x.shape[0], NUCLEUS_BINS
    bins = (x * (nb / x.amax(-1, keepdim=True))).long().clamp_(0, nb - 1)
    # One bincount, each row into its own bins: the CPU adds in element order, so a row's
    # masses are the same whatever rows come with it.
    flat = (bins + torch.arange(r)[:, None] * nb).view(-1)
    mass = torch.bincount(flat, weights=x.double().view(-1), minlength=r * nb).view(r, nb)
    with_bin = mass.flip(-1).cumsum(-1).flip(-1)
    above = with_bin - mass  # mass of the bins above each bin
    top_p = torch.tensor([params[j].top_p for j in tp], dtype=torch.float64)[:, None]
    budget = top_p * mass.sum(-1, keepdim=True)
    # The switching bin: everything above it is not enough, it and above is. A row without
    # one (rounding, a near-one-hot row) keeps everything; min-p may trim it.
    switch = (above < budget) & (with_bin >= budget)
    b = nb - 1 - switch.flip(-1).int().argmax(-1, keepdim=True)  # the last one
    members = (bins == b) & switch.any(-1, keepdim=True)
    counts = members.sum(-1)
    if not int(counts.max()):
        return torch.ones_like(x, dtype=torch.bool)
    rows, cols = members.nonzero(as_tuple=True)  # by row, then token
    slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    # Each row's members sorted, padded with -1 behind them.
    vals = torch.full((r, int(counts.max())), -1.0, dtype=torch.float64)
    vals[rows, slot] = x[rows, cols].double()
    vals = vals.sort(-1, descending=True).values
    before = above.gather(1, b) + torch.cat([vals.new_zeros(r, 1), vals.cumsum(-1)[:, :-1]], -1)
    # Ties: a value's "strictly more likely" mass excludes its equals: use the first of a run.
    first_of_run = torch.searchsorted(-vals, -vals, right=False)
    inside = (before.gather(1, first_of_run) < budget) & (vals >= 0)
    last = vals.shape[1] - 1 - inside.flip(-1).int().argmax(-1, keepdim=True)
    t_star = torch.where(inside.any(-1, keepdim=True), vals.gather(1, last), vals[:, :1])
    return x >= t_star.to(x.dtype)
