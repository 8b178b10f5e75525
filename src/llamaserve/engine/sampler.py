"""Next-token choice for every row of a batch: greedy, temperature, top-k, top-p, min-p, penalties.

Order of operations, per row: penalties (repetition, presence, frequency) -> temperature ->
top-k -> top-p over what is left -> min-p -> one draw.

Every row's token depends only on that row's logits, its parameters and its own random stream,
never on the other rows: each operation here is either elementwise or a reduction along the
vocabulary done row by row (softmax, cumsum, max, top-k), and rows are grouped by the shape of
the work they need (the k of top-k), so a row sees the same kernels alone or in a full batch.
Randomness comes from a per-request `random.Random` (one uniform per draw, by inverse CDF), so
a seeded request gives the same tokens in any batch and on any device.

Costs are kept per feature: a batch of greedy rows is one pass over the logits (a two-level
arg-max); top-k rows work on k candidates; penalties touch only the tokens a request has seen;
only rows without top-k (plain temperature, or top-p/min-p alone) compute exp over the whole
vocabulary, written over the logits: on CPU in fp32 by a compiled kernel a row per task
(llamaserve/kernels/sampling.cpp), elsewhere a cache-sized block of rows at a time (`_weights`). Top-p /
min-p rows there draw from the whole distribution and keep the draw when its token is in the
nucleus (rejection sampling, exact: a kept draw follows the nucleus distribution), deciding that
from as little of the row as the answer needs (`_in_nucleus`); so a seeded row may use a few
uniforms for one token, and the rare row that is refused NUCLEUS_DRAWS times gets an exact
whole-row search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain

import torch

from llamaserve.engine.request import SamplingParams, TokenLogprob
from llamaserve.kernels import sampling as sampling_kernel

# Draws a top-p / min-p row without top-k makes per token (all drawn at once, used in order
# until one is kept); refused every time, the row takes the exact whole-row search
# (`_nucleus_weights`, milliseconds per row). A draw is kept with probability at least top_p
# (the nucleus holds that much mass), so with top_p 0.9 one row in 10^4 gets there.
NUCLEUS_DRAWS = 4

# Whole-vocabulary rows are exponentiated and summed this many bytes of rows at a time (the
# per-core L2 cache of the CPUs measured is 2 MB; 1 MB blocks measured best).
ROWS_PER_BLOCK_BYTES = 1 << 20

# The nucleus test of a drawn token reads its row in this many segments of chunks and stops once
# the answer is known (`Sampler._in_nucleus`): on flat rows about half the reads of a whole-row
# test. Thirds of a 128K vocabulary are still big enough for every core to take a share.
NUCLEUS_SEGMENTS = 3

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
        # Builds the CPU sampling kernel now (about a second, once per machine), not in a request.
        sampling_kernel.fits(torch.empty(0, device=self.device))

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
        """logits [n, V] float32, one row per state, this call's own (penalties and the
        whole-vocabulary rows write over them); returns the chosen token ids and, when any row
        asked for them, per-row logprobs (None for rows that did not)."""
        n = logits.shape[0]
        greedy, sampled, want_logprobs, penalized = [], [], [], []
        for i, st in enumerate(states):
            (sampled if st.rng is not None else greedy).append(i)
            if st.params.logprobs is not None:
                want_logprobs.append(i)
            if st.penalized:
                penalized.append(i)

        if want_logprobs and not logits.is_contiguous():
            # Log-softmax wants rows; arg-max, top-k, penalties and whole-vocabulary sampling
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
        # Every seen token of every row in two flat lists (a request sees hundreds): built by
        # chaining the dicts, turned into tensors once; per-row values are repeated in torch.
        seen = [states[i].seen for i in rows]
        lengths = torch.tensor([len(d) for d in seen], device=self.device)
        f32 = dict(dtype=torch.float32, device=self.device)

        def per_token(values: list, **kw) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, **kw), lengths)

        token_ids = torch.tensor(list(chain.from_iterable(seen)), dtype=torch.long, device=self.device)
        count_t = torch.tensor(list(chain.from_iterable(d.values() for d in seen)), **f32)
        idx = (per_token(rows, dtype=torch.long, device=self.device), token_ids)
        x = logits[idx]
        params = [states[i].params for i in rows]
        rep_t = per_token([p.repetition_penalty for p in params], **f32)
        # CTRL / Hugging Face repetition penalty over prompt and output tokens: a seen token's
        # logit is divided by the penalty when positive, multiplied when negative.
        x = torch.where(x > 0, x / rep_t, x * rep_t)
        # OpenAI presence / frequency penalties, over generated tokens only.
        pres = per_token([p.presence_penalty for p in params], **f32)
        x = x - pres * (count_t > 0) - per_token([p.frequency_penalty for p in params], **f32) * count_t
        if not inplace:
            logits = logits.clone()
        logits[idx] = x
        return logits

    def _buffer(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused buffer: a fresh 16 MB tensor every step costs page faults."""
        numel = 1
        for d in shape:
            numel *= d
        bufs = self.__dict__.setdefault("_bufs", {})
        buf = bufs.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = bufs[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def _sample_rows(self, logits, rows, states, tokens) -> None:
        groups: dict[object, list[int]] = {}
        for i in rows:
            p = states[i].params
            key: object = ("top_k", min(p.top_k, self.vocab_size)) if p.top_k > 0 else ("whole",)
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            if key[0] == "whole":
                chosen = self._sample_whole(logits, members, states)
            else:
                u = torch.tensor([states[i].rng.random() for i in members], dtype=torch.float32)[:, None].to(self.device)
                x = self._rows(logits, members)
                inv_temp = 1.0 / torch.tensor([states[i].params.temperature for i in members], device=self.device)[:, None]
                chosen = self._sample_top_k(key[1], x, inv_temp, [states[i].params for i in members], u)
            tokens[self._index(members)] = chosen

    def _sample_top_k(self, k, x, inv_temp, params, u) -> torch.Tensor:
        values, ids = fast_topk(x, k) if k < self.vocab_size else torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(values * inv_temp, dim=-1)  # the original: top-p acts within the k
        return _draw(probs * _keep_mask(probs, params), u, ids)

    def _sample_whole(self, logits, members, states) -> torch.Tensor:
        """Rows without top-k: a draw from softmax(x / T) over the whole vocabulary, kept when the
        token passes the row's top-p / min-p (else drawn again). On CPU in fp32 the compiled
        kernel does it a row per task (llamaserve/kernels/sampling.cpp), else torch ops."""
        if not sampling_kernel.fits(logits):
            return self._sample_whole_torch(logits, members, states)
        params = [states[i].params for i in members]
        _, uniforms = _nucleus_uniforms(members, states, params)
        x = self._member_rows(logits, members)
        tokens = sampling_kernel.sample_whole(
            x, [p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params], uniforms)
        result = torch.tensor(tokens, dtype=torch.long)
        refused = [j for j, t in enumerate(tokens) if t == sampling_kernel.REFUSED]
        if refused:  # over the weights the kernel left in x
            result[self._index(refused)] = self._exact_nucleus_draw(x, refused, members, states, params)
        not_finite = [j for j, t in enumerate(tokens) if t == sampling_kernel.NOT_FINITE]
        if not_finite:
            # An infinite logit has all the probability; NaN has no distribution to draw from.
            # Either way the row (left as it was) gets its arg-max rather than an error that
            # would end every request of the step.
            result[self._index(not_finite)] = fast_argmax(x[self._index(not_finite)])
        return result

    def _member_rows(self, logits: torch.Tensor, members: list[int]) -> torch.Tensor:
        """The member rows as a contiguous [n, V] tensor that may be written over: the logits
        themselves when they are row-major and hold exactly those rows (the engine's case,
        logits of this call's own), else a copy in a reused buffer."""
        big_n, vocab = logits.shape
        n = len(members)
        if logits.is_contiguous() and members == list(range(big_n)):
            return logits
        x = self._buffer(0, (n, vocab), logits)
        if n == big_n:
            x.copy_(logits)  # a column-major head's logits: one transposing copy
        elif logits.t().is_contiguous():
            x.copy_(logits.t().index_select(1, self._index(members)).t())
        else:
            torch.index_select(logits, 0, self._index(members), out=x)
        return x

    def _sample_whole_torch(self, logits, members, states) -> torch.Tensor:
        """_sample_whole in torch ops (off the CPU, or without the kernel)."""
        params = [states[i].params for i in members]
        n, vocab = len(members), logits.shape[1]
        c = _chunk_size(vocab) or vocab
        inv_temp = [1.0 / p.temperature for p in params]
        e, mass, cdf, emax = self._weights(logits, members, c, params, inv_temp)
        totals = cdf[:, -1].tolist()
        total = cdf[:, -1]

        def draw(u: list[list[float]]) -> tuple[list[list[int]], list[list[float]]]:
            """Tokens and their weights e for every row, K uniforms [n][K] each."""
            target = torch.tensor(u, dtype=torch.float64, device=e.device) * total[:, None]  # [n, K]
            ci = _pick(cdf, mass, target)  # [n, K]
            below = torch.where(ci > 0, cdf.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
            inner_u = ((target - below) / mass.gather(1, ci)).clamp(0.0, 1.0)
            inner = e[torch.arange(n, device=e.device)[:, None], ci].view(-1, c)  # [n*K, c]
            pos = _draw(inner.double(), inner_u.view(-1, 1))
            tokens = (ci.view(-1) * c + pos).view(n, -1)
            return tokens.tolist(), inner.gather(1, pos[:, None]).view(n, -1).tolist()

        checked, uniforms = _nucleus_uniforms(members, states, params)
        all_tokens, all_values = draw(uniforms)
        tokens = [row[0] for row in all_tokens]
        if not any(checked):
            return torch.tensor(tokens, dtype=torch.long, device=e.device)
        min_p = [0.0] * n
        if emax is not None:
            min_p = [p.min_p * m for p, m in zip(params, emax)]  # the row's weight threshold
        # A refused weight refuses every weight at or below it (the mass above it can only grow).
        floor = [-1.0] * n
        pending = [j for j in range(n) if checked[j]]
        for attempt in range(NUCLEUS_DRAWS):
            vals = {j: all_values[j][attempt] for j in pending}
            ok = {j: v >= min_p[j] and v > floor[j] for j, v in vals.items()}
            check = [j for j in pending if ok[j] and params[j].top_p < 1.0]
            if check:
                need = [(1.0 - params[j].top_p) * totals[j] for j in check]
                for j, inside in zip(check, self._in_nucleus(e, mass, check, [vals[j] for j in check], need)):
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
            result[self._index(pending)] = self._exact_nucleus_draw(e.view(n, vocab), pending, members, states, params)
        return result

    def _exact_nucleus_draw(self, e, rows: list[int], members, states, params) -> torch.Tensor:
        """For rows of weights e [n, V] refused every time (a tiny top-p on flat logits, a large
        min-p): the exact whole-row nucleus search, and one more uniform of each row's stream."""
        weights = _nucleus_weights(e[self._index(rows)], [params[j] for j in rows])
        u = torch.tensor([states[members[j]].rng.random() for j in rows], dtype=torch.float64, device=e.device)
        return _draw_chunked(weights, u[:, None])

    def _weights(self, logits, members, c, params, inv_temp):
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
        x = self._member_rows(logits, members)
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

    def _in_nucleus(self, e, mass, rows: list[int], values: list[float], need: list[float]) -> list[bool]:
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
        y = self._buffer(1, (max(hi - lo for lo, hi in zip(bounds, bounds[1:])), c), e)
        acc = [0.0] * len(rows)
        inside = [False] * len(rows)
        open_rows = list(range(len(rows)))
        for lo, hi in zip(bounds, bounds[1:]):
            above = torch.empty(len(open_rows), hi - lo, dtype=e.dtype, device=e.device)
            segment, ys = e[:, lo:hi].unbind(0), y[: hi - lo]
            for k, out in zip(open_rows, above.unbind(0)):
                torch.sum(torch.threshold(segment[rows[k]], values[k], 0.0, out=ys), -1, out=out)
            whole = mass[self._index([rows[k] for k in open_rows]), lo:hi]
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


def _nucleus_uniforms(members: list[int], states, params) -> tuple[list[bool], list[list[float]]]:
    """Which rows have a top-p / min-p test, and every uniform each row may need, drawn at once:
    one for a plain row, NUCLEUS_DRAWS for a tested row (used in order until a draw is kept).
    Only those are consumed from a row's stream; the rest of the [n][draws] table is padding."""
    checked = [p.top_p < 1.0 or p.min_p > 0.0 for p in params]
    draws = NUCLEUS_DRAWS if any(checked) else 1
    return checked, [
        [states[i].rng.random() for _ in range(draws if chk else 1)] + [0.5] * (draws - (draws if chk else 1))
        for i, chk in zip(members, checked)
    ]


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


# Value bins of the exact top-p search over a whole row (weights relative to the row's max).
NUCLEUS_BINS = 4096


def _nucleus_weights(e: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
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
        if int(counts.max()):
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
            keep[torch.tensor(tp, device=e.device)] = (x >= t_star.to(x.dtype)).to(keep.device)
    min_p = [p.min_p for p in params]
    if any(mp > 0 for mp in min_p):
        mp_t = torch.tensor(min_p, dtype=e.dtype, device=e.device)[:, None]
        keep &= e >= mp_t * e.amax(-1, keepdim=True)
    return e * keep


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
    """[r, K] first column whose cdf exceeds each target (it always has weight > 0) ..."""
    pos = torch.searchsorted(cdf, target, right=True)
    over = pos >= weights.shape[1]
    if bool(over.any()):
        # ... unless rounding put the target at the very top: take the last column with weight.
        rows = over.any(-1).nonzero()[:, 0]
        last = weights.shape[1] - 1 - (weights[rows].flip(-1) > 0).int().argmax(-1, keepdim=True)
        pos[rows] = torch.where(over[rows], last, pos[rows])
    return pos


def _draw(weights: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draw of one column per row of non-negative `weights` [r, K], with a uniform
    u [r, 1] per row; `ids` maps columns to token ids (None: the column is the token id)."""
    cdf = torch.cumsum(weights, dim=-1)
    pos = _pick(cdf, weights, u.to(cdf.dtype) * cdf[:, -1:])
    chosen = pos if ids is None else ids.gather(1, pos)
    return chosen[:, 0]
