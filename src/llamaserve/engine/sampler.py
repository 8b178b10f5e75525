"""Next-token choice for every row of a batch: greedy, temperature, top-k, top-p, min-p, penalties.

Order of operations, per row: penalties (repetition, presence, frequency) -> temperature ->
top-k -> top-p over what is left -> min-p -> one draw.

Every row's token depends only on that row's logits, its parameters and its own random stream,
never on the other rows: each operation here is either elementwise or a reduction along the
vocabulary done row by row (softmax, cumsum, max, top-k), and rows are grouped by the shape of
the work they need (the k of top-k), so a row sees the same kernels alone or in a full batch.
Randomness comes from a per-request `random.Random` (one uniform per token, drawn by inverse
CDF), so a seeded request gives the same tokens in any batch and on any device.

Costs are kept per feature: a batch of greedy rows is one pass over the logits (a two-level
arg-max); top-k rows work on k candidates; penalties touch only the tokens a request has seen;
only rows without top-k (plain temperature, or top-p/min-p alone) compute exp over the whole
vocabulary, in a reused buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from llamaserve.engine.request import SamplingParams, TokenLogprob

# Top-p / min-p rows without top-k first look at this many most likely tokens; when the
# nucleus does not fit (a very flat distribution) the row falls back to an exact whole-row
# search (`_nucleus_weights`), which costs a few milliseconds per row.
NUCLEUS_CANDIDATES = 256

# Prompt logprobs are reduced this many rows at a time (64 x 128K fp32 = 32 MB of temporaries).
PROMPT_LOGPROB_ROWS = 64


@dataclass
class SamplingState:
    """Per-request sampler state, created when the request's first token is sampled."""

    params: SamplingParams
    rng: random.Random | None  # None for greedy requests
    # With penalties: every token of prompt and output -> times generated (0: prompt only).
    # Penalties touch only these entries, never the whole vocabulary.
    seen: dict[int, int] | None = None

    @property
    def penalized(self) -> bool:
        return self.seen is not None


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


@lru_cache(maxsize=16)
def _chunk_size(vocab: int) -> int:
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
    c = _chunk_size(vocab)
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
    c = _chunk_size(vocab)
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


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._seed_source = random.SystemRandom()

    def start(self, params: SamplingParams, prompt_token_ids: list[int]) -> SamplingState:
        """State of a request about to sample its first token."""
        rng = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else self._seed_source.getrandbits(64)
            rng = random.Random(seed)
        seen = dict.fromkeys(prompt_token_ids, 0) if uses_penalties(params) else None
        return SamplingState(params, rng, seen)

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, states: list[SamplingState]
    ) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """logits [n, V] float32, one row per state; returns the chosen token ids and, when any
        row asked for them, per-row logprobs (None for rows that did not)."""
        n = logits.shape[0]
        greedy, sampled, want_logprobs, penalized = [], [], [], []
        for i, st in enumerate(states):
            (sampled if st.rng is not None else greedy).append(i)
            if st.params.logprobs is not None:
                want_logprobs.append(i)
            if st.penalized:
                penalized.append(i)

        whole_rows = want_logprobs or any(states[i].params.top_k <= 0 for i in sampled)
        if whole_rows and not logits.is_contiguous():
            # Row-wise work over the whole vocabulary wants rows; arg-max, top-k and penalties
            # read column-major logits (the CPU head's weight @ h^T) in place.
            logits = logits.contiguous()
        raw_logprobs = None
        if want_logprobs:
            # Logprobs describe the model's own distribution, before penalties and temperature.
            raw_logprobs = torch.log_softmax(self._rows(logits, want_logprobs), dim=-1)
        if penalized:
            # The batch's logits are this call's own: penalise them in place.
            logits = self._apply_penalties(logits, penalized, states, inplace=True)

        if not sampled:
            tokens = fast_argmax(logits)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            if greedy:
                tokens[self._index(greedy)] = fast_argmax(self._rows(logits, greedy))
            self._sample_rows(logits, sampled, states, tokens)
        token_ids = tokens.tolist()

        for i in penalized:
            seen = states[i].seen
            seen[token_ids[i]] = seen.get(token_ids[i], 0) + 1

        logprobs = None
        if want_logprobs:
            logprobs = [None] * n
            chosen = raw_logprobs.gather(1, self._index([token_ids[i] for i in want_logprobs])[:, None])[:, 0].tolist()
            top_n = max(states[i].params.logprobs for i in want_logprobs)
            top_vals, top_ids = fast_topk(raw_logprobs, top_n) if top_n else (None, None)
            top_vals = top_vals.tolist() if top_n else None
            top_ids = top_ids.tolist() if top_n else None
            for j, i in enumerate(want_logprobs):
                k = states[i].params.logprobs
                top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
                logprobs[i] = TokenLogprob(token_ids[i], chosen[j], top)
        return token_ids, logprobs

    @torch.inference_mode()
    def prompt_logprobs(self, logits: torch.Tensor, next_ids: list[int], top_n: int) -> list[TokenLogprob]:
        """Logprob of next_ids[i] under row i of logits [T, V] (any layout), with the top_n
        most likely tokens; rows past len(next_ids) are ignored. Done a block of rows at a time
        so a long prompt chunk never needs a second [T, V] tensor next to the model's output."""
        out: list[TokenLogprob] = []
        for lo in range(0, len(next_ids), PROMPT_LOGPROB_ROWS):
            ids = next_ids[lo : lo + PROMPT_LOGPROB_ROWS]
            x = logits[lo : lo + len(ids)]
            lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [r, 1]
            # One subtraction of the same operands for the chosen and the top values, so a
            # greedy token's logprob equals its top-1 entry to the bit (lm-eval's is_greedy).
            chosen = (x.gather(1, self._index(ids)[:, None]) - lse)[:, 0].tolist()
            if top_n:
                top_vals, top_ids = fast_topk(x, top_n)
                top_vals, top_ids = (top_vals - lse).tolist(), top_ids.tolist()
            for j, token in enumerate(ids):
                top = list(zip(top_ids[j], top_vals[j])) if top_n else []
                out.append(TokenLogprob(token, chosen[j], top))
        return out

    @torch.inference_mode()
    def penalized_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """The logits after each row's penalties, as the next `sample` would see them."""
        rows = [i for i, st in enumerate(states) if st.penalized]
        return self._apply_penalties(logits, rows, states) if rows else logits

    # ---- pieces ------------------------------------------------------------------------------
    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if len(rows) == x.shape[0]:
            return x
        return x[self._index(rows)]

    def _apply_penalties(self, logits, rows, states, inplace: bool = False) -> torch.Tensor:
        row_ids, token_ids, counts, rep, pres, freq = [], [], [], [], [], []
        for i in rows:
            st = states[i]
            p = st.params
            n = len(st.seen)
            row_ids += [i] * n
            token_ids += st.seen.keys()
            counts += st.seen.values()
            rep += [p.repetition_penalty] * n
            pres += [p.presence_penalty] * n
            freq += [p.frequency_penalty] * n
        idx = (self._index(row_ids), self._index(token_ids))
        x = logits[idx]
        f32 = dict(dtype=torch.float32, device=self.device)
        rep_t = torch.tensor(rep, **f32)
        count_t = torch.tensor(counts, **f32)
        # CTRL / Hugging Face repetition penalty over prompt and output tokens: a seen token's
        # logit is divided by the penalty when positive, multiplied when negative.
        x = torch.where(x > 0, x / rep_t, x * rep_t)
        # OpenAI presence / frequency penalties, over generated tokens only.
        x = x - torch.tensor(pres, **f32) * (count_t > 0) - torch.tensor(freq, **f32) * count_t
        if not inplace:
            logits = logits.clone()
        logits[idx] = x
        return logits

    def _workspace(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A reused [rows, V] buffer: a fresh 16 MB tensor every step costs page faults."""
        ws = getattr(self, "_ws", None)
        if ws is None or ws.shape[0] < rows or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._ws = torch.empty(max(rows, 1), like.shape[1], dtype=like.dtype, device=like.device)
        return ws[:rows]

    def _scaled_exp(self, x: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
        """Unnormalised softmax(x / T) = exp((x - max) / T), in the workspace."""
        e = self._workspace(x.shape[0], x)
        m = x.amax(-1, keepdim=True)
        torch.addcmul(-m * inv_temp, x, inv_temp, out=e)
        return e.exp_()

    def _sample_rows(self, logits, rows, states, tokens) -> None:
        groups: dict[object, list[int]] = {}
        for i in rows:
            p = states[i].params
            if p.top_k > 0:
                key: object = ("top_k", min(p.top_k, self.vocab_size))
            elif p.top_p < 1.0 or p.min_p > 0.0:
                key = ("nucleus", min(NUCLEUS_CANDIDATES, self.vocab_size))
            else:
                key = ("full",)
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            u = torch.tensor([states[i].rng.random() for i in members], dtype=torch.float32)[:, None].to(self.device)
            x = self._rows(logits, members)
            inv_temp = 1.0 / torch.tensor([states[i].params.temperature for i in members], device=self.device)[:, None]
            if key[0] == "full":
                chosen = self._draw_full(x, inv_temp, u)
            else:
                chosen = self._sample_restricted(key, x, inv_temp, members, states, u)
            tokens[self._index(members)] = chosen

    def _draw_full(self, x, inv_temp, u) -> torch.Tensor:
        """Draw from softmax(x / T) over the whole vocabulary."""
        return _draw_chunked(self._scaled_exp(x, inv_temp), u)

    def _sample_restricted(self, key, x, inv_temp, members, states, u) -> torch.Tensor:
        kind, k = key
        params = [states[i].params for i in members]
        values, ids = fast_topk(x, k) if k < self.vocab_size else torch.sort(x, dim=-1, descending=True)
        if kind == "top_k":
            probs = torch.softmax(values * inv_temp, dim=-1)  # the original: top-p acts within the k
            return _draw(probs * _keep_mask(probs, params), u, ids)
        # Normalised over the whole vocabulary, so the nucleus mass is the true one.
        e = self._scaled_exp(x, inv_temp)
        probs = e.gather(1, ids) / _row_sums(e)
        keep = _keep_mask(probs, params)
        overflow = keep[:, -1].tolist() if k < self.vocab_size else [False]
        if not any(overflow):
            return _draw(probs * keep, u, ids)
        # The nucleus reaches past the candidates: redo those rows over the whole vocabulary.
        chosen = torch.empty(len(members), dtype=torch.long, device=x.device)
        inside = [j for j, o in enumerate(overflow) if not o]
        outside = [j for j, o in enumerate(overflow) if o]
        if inside:
            sub = self._index(inside)
            chosen[sub] = _draw(probs[sub] * keep[sub], u[sub], ids[sub])
        sub = self._index(outside)
        chosen[sub] = _draw_chunked(_nucleus_weights(e[sub], [params[j] for j in outside]), u[sub])
        return chosen


def _draw_chunked(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over whole-vocabulary weights [r, V]: pick a chunk of the vocabulary by
    its mass, then a token inside it (two short cumulative sums instead of one long one)."""
    r, vocab = weights.shape
    c = _chunk_size(vocab)
    if not c:
        return _draw(weights, u)
    chunks = weights.reshape(r, vocab // c, c)
    mass = chunks.sum(-1)  # [r, n_chunks]
    cdf = torch.cumsum(mass, dim=-1)
    target = u.to(cdf.dtype) * cdf[:, -1:]
    ci = _pick(cdf, mass, target)  # [r, 1]
    below = torch.where(ci > 0, cdf.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
    inner_u = ((target - below) / mass.gather(1, ci)).clamp(0.0, 1.0)
    inner = chunks.gather(1, ci[:, :, None].expand(r, 1, c))[:, 0]  # [r, c]
    return ci[:, 0] * c + _draw(inner, inner_u)


# Value bins of the exact top-p search over a whole row (probabilities relative to the max).
NUCLEUS_BINS = 4096


def _nucleus_weights(e: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-p / min-p over whole rows without sorting them: e [r, V] unnormalised probabilities
    (the most likely token has e = 1).

    A token is in the nucleus when the mass of the strictly more likely tokens is below
    top_p: that is every token >= t*, the smallest value v with mass(e > v) < top_p * mass.
    A mass histogram over value bins finds the one bin where that switches; only the tokens of
    that bin are sorted. Tokens tied at t* are all kept. Masses are summed in float64.
    """
    keep = torch.ones_like(e, dtype=torch.bool)
    for j, p in enumerate(params):
        if p.top_p >= 1.0:
            continue
        # On the CPU: a GPU bincount adds weights atomically, in no fixed order.
        row = e[j].cpu()
        bins = (row * NUCLEUS_BINS).long().clamp_(0, NUCLEUS_BINS - 1)
        mass = torch.bincount(bins, weights=row.double(), minlength=NUCLEUS_BINS)  # [NB]
        above = mass.flip(0).cumsum(0).flip(0) - mass  # mass of the bins above each bin
        budget = p.top_p * float(mass.sum())
        # The switching bin: everything above it is not enough, it and above is.
        switch = ((above < budget) & (above + mass >= budget)).nonzero()
        if not switch.numel():
            continue  # rounding left no bin (a near-one-hot row): keep everything, min-p may trim
        b = int(switch[-1])
        members = (bins == b).nonzero()[:, 0]
        vals = row[members].double().sort(descending=True).values
        before = float(above[b]) + torch.cat([vals.new_zeros(1), vals.cumsum(0)[:-1]])
        # Ties: a value's "strictly more likely" mass excludes its equals, so use the first of a run.
        first_of_run = torch.searchsorted(-vals, -vals, right=False)
        inside = before[first_of_run] < budget
        t_star = vals[inside.nonzero()[-1, 0]] if bool(inside.any()) else vals[0]
        keep[j] = (row >= t_star.to(row.dtype)).to(keep.device)
    min_p = [p.min_p for p in params]
    if any(mp > 0 for mp in min_p):
        mp_t = torch.tensor(min_p, dtype=e.dtype, device=e.device)[:, None]
        keep &= e >= mp_t * e.amax(-1, keepdim=True)
    return e * keep


def _row_sums(e: torch.Tensor) -> torch.Tensor:
    """[r, 1] row sums computed the same way whatever r is: chunk sums, then a short sum (a
    plain sum over a long row may be split across threads when there are few rows)."""
    r, vocab = e.shape
    c = _chunk_size(vocab)
    if not c:
        return torch.cumsum(e, dim=-1)[:, -1:]
    return e.reshape(r, vocab // c, c).sum(-1).sum(-1, keepdim=True)


def _keep_mask(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
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


def _pick(cdf: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[r, 1] first column whose cdf exceeds target (it always has weight > 0) ..."""
    pos = torch.searchsorted(cdf, target, right=True)
    over = (pos >= weights.shape[1]).view(-1)
    if bool(over.any()):
        # ... unless rounding put the target at the very top: take the last column with weight.
        rows = over.nonzero()[:, 0]
        last = weights.shape[1] - 1 - (weights[rows].flip(-1) > 0).int().argmax(-1)
        pos[rows, 0] = last
    return pos


def _draw(weights: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draw of one column per row of non-negative `weights` [r, K], with a uniform
    u [r, 1] per row; `ids` maps columns to token ids (None: the column is the token id)."""
    cdf = torch.cumsum(weights, dim=-1)
    pos = _pick(cdf, weights, u.to(cdf.dtype) * cdf[:, -1:])
    chosen = pos if ids is None else ids.gather(1, pos)
    return chosen[:, 0]
