"""The Sampler: next-token choice for every row of a batch (see the package docstring)."""

from __future__ import annotations

import os
import random

import torch

from llamaserve.engine.request import SamplingParams, TokenLogprob
from llamaserve.engine.sampling import whole
from llamaserve.engine.sampling.counter_uniforms import seed_key
from llamaserve.engine.sampling.draw import draw, keep_mask
from llamaserve.engine.sampling.on_device import DeviceDraws
from llamaserve.engine.sampling.reduce import fast_argmax, fast_topk
from llamaserve.engine.sampling.rows import Rows
from llamaserve.engine.sampling.state import SamplingState, apply_penalties, uses_penalties
from llamaserve.engine.sampling.whole_kernel import KernelWholeVocab
from llamaserve.engine.sampling.whole_torch import TorchWholeVocab
from llamaserve.kernels import sampling as sampling_kernel

# Prompt logprobs are reduced this many rows at a time (64 x 128K fp32 = 32 MB of temporaries).
PROMPT_LOGPROB_ROWS = 64


# Which sampler draws the sampled rows: "device" (on_device.py: every row in one sequence of
# tensor operations, counter-based uniforms) or "host" (this file: rows grouped by their work,
# per-request random.Random); unset: device on GPUs, host elsewhere (the host paths are the
# faster ones on a CPU, the device one keeps a GPU's step free of host work).
SAMPLER_ENV = "LLAMASERVE_SAMPLER"


def draws_on_device(device: torch.device) -> bool:
    choice = os.environ.get(SAMPLER_ENV, "")
    if choice not in ("", "host", "device"):
        raise ValueError(f"{SAMPLER_ENV} must be 'host' or 'device', got {choice!r}")
    return choice == "device" or (not choice and device.type == "cuda")


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", rows: int | None = None) -> None:
        """rows: the most rows one call samples (the device sampler runs every call on that
        many, one shape: on_device.py)."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.device_draws = DeviceDraws(rows) if draws_on_device(self.device) else None
        self.rows = Rows(self.device)
        self.whole_kernel = KernelWholeVocab(self.rows)
        self.whole_torch = TorchWholeVocab(self.rows)
        self._seed_source = random.SystemRandom()
        # Builds the CPU sampling kernel now (about a second, once per machine), not in a request.
        sampling_kernel.fits(torch.empty(0, device=self.device))

    def start(self, params: SamplingParams, prompt_token_ids: list[int]) -> SamplingState:
        """State of a request about to sample its first token."""
        rng = key = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else self._seed_source.getrandbits(64)
            rng = random.Random(seed)
            key = seed_key(seed)
        seen = dict.fromkeys(prompt_token_ids, 0) if uses_penalties(params) else None
        return SamplingState(params, rng, seen, key)

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
            raw_logprobs = torch.log_softmax(self.rows.select(logits, want_logprobs), dim=-1)
        if penalized:
            # The batch's logits are this call's own: penalise them in place.
            logits = apply_penalties(logits, penalized, states, self.device, inplace=True)

        if not sampled:
            tokens = fast_argmax(logits)
        elif self.device_draws is not None:
            tokens = self.device_draws.sample(logits, states)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            if greedy:
                tokens[self.rows.index(greedy)] = fast_argmax(self.rows.select(logits, greedy))
            self._sample_rows(logits, sampled, states, tokens)
        token_ids = tokens.tolist()

        for i in penalized:
            seen = states[i].seen
            seen[token_ids[i]] = seen.get(token_ids[i], 0) + 1
        if not want_logprobs:
            return token_ids, None
        return token_ids, self._logprobs(raw_logprobs, want_logprobs, token_ids, states)

    def _logprobs(self, raw_logprobs, want: list[int], token_ids: list[int], states) -> list[TokenLogprob | None]:
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        chosen = raw_logprobs.gather(1, self.rows.index([token_ids[i] for i in want])[:, None])[:, 0].tolist()
        top_n = max(states[i].params.logprobs for i in want)
        top_vals, top_ids = fast_topk(raw_logprobs, top_n) if top_n else (None, None)
        top_vals = top_vals.tolist() if top_n else None
        top_ids = top_ids.tolist() if top_n else None
        for j, i in enumerate(want):
            k = states[i].params.logprobs
            top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
            logprobs[i] = TokenLogprob(token_ids[i], chosen[j], top)
        return logprobs

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
            chosen = (x.gather(1, self.rows.index(ids)[:, None]) - lse)[:, 0].tolist()
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
        return apply_penalties(logits, rows, states, self.device) if rows else logits

    # ---- sampled rows --------------------------------------------------------------------------
    def _sample_rows(self, logits, rows, states, tokens) -> None:
        """Rows grouped by the work they need: top-k rows by their k, the rest whole-vocabulary."""
        groups: dict[object, list[int]] = {}
        for i in rows:
            p = states[i].params
            key: object = ("top_k", min(p.top_k, self.vocab_size)) if p.top_k > 0 else ("whole",)
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            if key[0] == "whole":
                chosen = whole.for_logits(logits, self.whole_kernel, self.whole_torch).sample(logits, members, states)
            else:
                u = torch.tensor([states[i].rng.random() for i in members], dtype=torch.float32)[:, None].to(self.device)
                x = self.rows.select(logits, members)
                inv_temp = 1.0 / torch.tensor([states[i].params.temperature for i in members], device=self.device)[:, None]
                chosen = self._sample_top_k(key[1], x, inv_temp, [states[i].params for i in members], u)
            tokens[self.rows.index(members)] = chosen

    def _sample_top_k(self, k, x, inv_temp, params, u) -> torch.Tensor:
        values, ids = fast_topk(x, k) if k < self.vocab_size else torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(values * inv_temp, dim=-1)  # the original: top-p acts within the k
        return draw(probs * keep_mask(probs, params), u, ids)
