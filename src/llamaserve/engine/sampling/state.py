"""Per-request sampler state and the penalties, which touch only the tokens a request has seen."""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain

import torch

from llamaserve.engine.request import SamplingParams


@dataclass
class SamplingState:
    """Per-request sampler state, created when the request's first token is sampled."""

    params: SamplingParams
    rng: random.Random | None  # None for greedy requests
    # With penalties: every token of prompt and output -> times generated (0: prompt only).
    # Penalties touch only these entries, never the whole vocabulary.
    seen: dict[int, int] | None = None
    # The device sampler's stream (counter_uniforms.py): the request's key (None for greedy
    # requests) and how many tokens it has drawn.
    key: int | None = None
    draws: int = 0

    @property
    def penalized(self) -> bool:
        return self.seen is not None


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, rows: list[int], states: list[SamplingState], device: torch.device,
                    inplace: bool = False) -> torch.Tensor:
    """Each of `rows` of logits [n, V] with its request's penalties (a copy unless `inplace`)."""
    # Every seen token of every row in two flat lists (a request sees hundreds): built by
    # chaining the dicts, turned into tensors once; per-row values are repeated in torch.
    seen = [states[i].seen for i in rows]
    lengths = torch.tensor([len(d) for d in seen], device=device)
    f32 = dict(dtype=torch.float32, device=device)

    def per_token(values: list, **kw) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor(values, **kw), lengths)

    token_ids = torch.tensor(list(chain.from_iterable(seen)), dtype=torch.long, device=device)
    count_t = torch.tensor(list(chain.from_iterable(d.values() for d in seen)), **f32)
    idx = (per_token(rows, dtype=torch.long, device=device), token_ids)
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
