"""Whole-vocabulary sampling in torch ops (off the CPU, or without the kernel).

exp(x / T) is written over the logits a cache-sized block of rows at a time (`weights`); a draw
picks a chunk by its mass, then a token in it; a top-p row keeps its draw when the token is in
the nucleus, decided from as little of the row as the answer needs (`in_nucleus`).
"""

from __future__ import annotations

import torch

from llamaserve.engine.sampling.draw import draw, pick
from llamaserve.engine.sampling.nucleus import NUCLEUS_DRAWS, exact_nucleus_draw, nucleus_uniforms
from llamaserve.engine.sampling.reduce import chunk_size
from llamaserve.engine.sampling.rows import Rows

# Whole-vocabulary rows are exponentiated and summed this many bytes of rows at a time (the
# per-core L2 cache of the CPUs measured is 2 MB; 1 MB blocks measured best).
ROWS_PER_BLOCK_BYTES = 1 << 20

# The nucleus test of a drawn token reads its row in this many segments of chunks and stops once
# the answer is known (`in_nucleus`): on flat rows about half the reads of a whole-row test.
# Thirds of a 128K vocabulary are still big enough for every core to take a share.
NUCLEUS_SEGMENTS = 3


class TorchWholeVocab:
    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def sample(self, logits: torch.Tensor, members: list[int], states: list) -> torch.Tensor:
        params = [states[i].params for i in members]
        n, vocab = len(members), logits.shape[1]
        c = chunk_size(vocab) or vocab
        e, mass, cdf, emax = self.weights(logits, members, c, params, [1.0 / p.temperature for p in params])
        checked, uniforms = nucleus_uniforms(members, states, params)
        all_tokens, all_values = _draw_weights(e, mass, cdf, uniforms)
        tokens = [row[0] for row in all_tokens]
        if not any(checked):
            return torch.tensor(tokens, dtype=torch.long, device=e.device)
        min_p = [0.0] * n
        if emax is not None:
            min_p = [p.min_p * m for p, m in zip(params, emax)]  # the row's weight threshold
        totals = cdf[:, -1].tolist()
        # A refused weight refuses every weight at or below it (the mass above it can only grow).
        floor = [-1.0] * n
        pending = [j for j in range(n) if checked[j]]
        for attempt in range(NUCLEUS_DRAWS):
            vals = {j: all_values[j][attempt] for j in pending}
            ok = {j: v >= min_p[j] and v > floor[j] for j, v in vals.items()}
            check = [j for j in pending if ok[j] and params[j].top_p < 1.0]
            if check:
                need = [(1.0 - params[j].top_p) * totals[j] for j in check]
                for j, inside in zip(check, self.in_nucleus(e, mass, check, [vals[j] for j in check], need)):
                    ok[j] = inside
            for j in pending:
                if ok[j]:
                    tokens[j] = all_tokens[j][attempt]
                else:
                    floor[j] = max(floor[j], vals[j])
            pending = [j for j in pending if not ok[j]]
            if not pending:
                break
        result = torch.tensor(tokens, dtype=torch.long, device=e.device)
        if pending:
            result[self.rows.index(pending)] = exact_nucleus_draw(e.view(n, vocab), pending, members, states, params,
                                                                  self.rows)
        return result

    def weights(self, logits, members, c, params, inv_temp):
        """exp(x / T) of the member rows as [n, V/c, c], its chunk sums [n, V/c], their running
        sums in float64 (sequential per row), and each row's largest weight when a row uses min-p.

        Row-major logits holding exactly the member rows (the engine's case) are this call's own:
        the weights are written over them, which saves reading a buffer in before writing it. Any
        other layout or subset is first copied into a buffer, and the same blocks run there.

        A block of rows at a time: its row maxima (the first read of the block, bringing it into
        cache), then x / T and exp in place, then its chunk sums while it is in cache. exp(x / T)
        is taken without subtracting the row maximum (a pass over the block saved) when the
        maximum of x / T is in [-30, 64]: nothing overflows and no token that matters loses
        precision; other rows have their maximum subtracted first. Each row is judged on its own
        numbers."""
        vocab = logits.shape[1]
        n = len(members)
        x = self.rows.writable(logits, members)
        f32 = dict(dtype=x.dtype, device=x.device)
        mass = torch.empty(n, vocab // c, **f32)
        inv = torch.tensor(inv_temp, **f32)[:, None] if any(t != 1.0 for t in inv_temp) else None
        want_max = any(p.min_p > 0.0 for p in params)
        emax = torch.empty(n, **f32) if want_max else None
        step = max(1, ROWS_PER_BLOCK_BYTES // (vocab * x.element_size()))
        # On an accelerator the maxima come all at once, so that blocks wait on the host once.
        tops = x.amax(-1).tolist() if x.device.type != "cpu" else None
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            blk = x[lo:hi]
            top = blk.amax(-1).tolist() if tops is None else tops[lo:hi]
            shifted = [k for k, m in enumerate(top) if not -30.0 <= m * inv_temp[lo + k] <= 64.0]  # NaN too
            if inv is not None:
                blk.mul_(inv[lo:hi])  # exact per element, whatever path the kernel takes
            if shifted:
                # The maximum of x / T as its elements were rounded; subtracting 0 from the other
                # rows of the block leaves them bit for bit as they are.
                shift = torch.zeros(hi - lo, 1, **f32)
                for k in shifted:
                    shift[k] = blk[k].amax()
                blk.sub_(shift)
            blk.exp_()
            torch.sum(blk.view(hi - lo, vocab // c, c), -1, out=mass[lo:hi])
            if want_max:
                torch.amax(blk, -1, out=emax[lo:hi])
        cdf = mass.double().cumsum(-1)
        return x.view(n, vocab // c, c), mass, cdf, (emax.tolist() if want_max else None)

    def in_nucleus(self, e, mass, rows: list[int], values: list[float], need: list[float]) -> list[bool]:
        """For rows of e [n, V/c, c] with chunk sums `mass` [n, V/c]: whether the mass of the
        weights at or below each row's value exceeds need[k] = (1 - top_p) * total, i.e. whether
        the mass strictly above it is below top_p * total.

        The row is read in NUCLEUS_SEGMENTS segments of chunks, one exact threshold pass per
        segment: each chunk adds its sum minus the sum of its weights above the value, in float64,
        in chunk order. Those terms are >= 0 (the thresholded chunk sums a subset of the same
        numbers in the same order), so the running sum only grows and a row can stop at the first
        segment where it exceeds `need`: the answer is the whole row's. On flat rows most draws
        sit well inside the nucleus and stop after the first segment."""
        n_chunks, c = e.shape[1], e.shape[2]
        bounds = [n_chunks * g // NUCLEUS_SEGMENTS for g in range(NUCLEUS_SEGMENTS + 1)]
        y = self.rows.buffer(1, (max(hi - lo for lo, hi in zip(bounds, bounds[1:])), c), e)
        acc = [0.0] * len(rows)
        inside = [False] * len(rows)
        open_rows = list(range(len(rows)))
        for lo, hi in zip(bounds, bounds[1:]):
            above = torch.empty(len(open_rows), hi - lo, dtype=e.dtype, device=e.device)
            segment, ys = e[:, lo:hi].unbind(0), y[: hi - lo]
            for k, out in zip(open_rows, above.unbind(0)):
                torch.sum(torch.threshold(segment[rows[k]], values[k], 0.0, out=ys), -1, out=out)
            whole = mass[self.rows.index([rows[k] for k in open_rows]), lo:hi]
            at_or_below = (whole.double() - above.double()).cumsum(-1)[:, -1].tolist()  # sequential per row
            still = []
            for i, k in enumerate(open_rows):
                acc[k] += at_or_below[i]
                if acc[k] > need[k]:
                    inside[k] = True
                else:
                    still.append(k)
            open_rows = still
            if not open_rows:
                break
        return inside


def _draw_weights(e, mass, cdf, u: list[list[float]]) -> tuple[list[list[int]], list[list[float]]]:
    """Tokens and their weights e for every row of e [n, V/c, c], K uniforms [n][K] each."""
    n, c = e.shape[0], e.shape[2]
    total = cdf[:, -1]
    target = torch.tensor(u, dtype=torch.float64, device=e.device) * total[:, None]  # [n, K]
    ci = pick(cdf, target)  # [n, K]
    below = torch.where(ci > 0, cdf.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
    inner_u = ((target - below) / mass.gather(1, ci)).clamp(0.0, 1.0)
    inner = e[torch.arange(n, device=e.device)[:, None], ci].view(-1, c)  # [n*K, c]
    pos = draw(inner.double(), inner_u.view(-1, 1))
    tokens = (ci.view(-1) * c + pos).view(n, -1)
    return tokens.tolist(), inner.gather(1, pos[:, None]).view(n, -1).tolist()
