"""Whole-vocabulary sampling on the compiled CPU kernel (llamaserve/kernels/sampling.cpp)."""

from __future__ import annotations

import torch

from llamaserve.engine.sampling.nucleus import exact_nucleus_draw, nucleus_uniforms
from llamaserve.engine.sampling.reduce import fast_argmax
from llamaserve.engine.sampling.rows import Rows
from llamaserve.kernels import sampling as sampling_kernel


class KernelWholeVocab:
    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def sample(self, logits: torch.Tensor, members: list[int], states: list) -> torch.Tensor:
        rows = self.rows
        params = [states[i].params for i in members]
        _, uniforms = nucleus_uniforms(members, states, params)
        x = rows.writable(logits, members)
        tokens = sampling_kernel.sample_whole(
            x, [p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params], uniforms)
        result = torch.tensor(tokens, dtype=torch.long)
        refused = [j for j, t in enumerate(tokens) if t == sampling_kernel.REFUSED]
        if refused:  # over the weights the kernel left in x
            result[rows.index(refused)] = exact_nucleus_draw(x, refused, members, states, params, rows)
        not_finite = [j for j, t in enumerate(tokens) if t == sampling_kernel.NOT_FINITE]
        if not_finite:
            # An infinite logit has all the probability; NaN has no distribution to draw from.
            # Either way the row (left as it was) gets its arg-max rather than an error that
            # would end every request of the step.
            result[rows.index(not_finite)] = fast_argmax(x[rows.index(not_finite)])
        return result
