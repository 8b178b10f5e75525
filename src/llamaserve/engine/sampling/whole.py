"""Whole-vocabulary sampling: rows without top-k draw from softmax(x / T) over every token,
kept when the token passes the row's top-p / min-p (rejection sampling, exact: a kept draw
follows the nucleus distribution), else drawn again (NUCLEUS_DRAWS uniforms per row, then the
exact search of nucleus.py).

One interface, two implementations: the compiled CPU kernel (whole_kernel.py, fp32 on the CPU,
a row per task) and torch ops (whole_torch.py, any device). `for_logits` picks by capability.
"""

from __future__ import annotations

from typing import Protocol

import torch

from llamaserve.kernels import sampling as sampling_kernel


class WholeVocabSampler(Protocol):
    def sample(self, logits: torch.Tensor, members: list[int], states: list) -> torch.Tensor:
        """Token ids [len(members)] for rows `members` of logits [n, V], from each row's own
        random stream (states[i].rng); may write over the logits when they are this call's own
        (row-major, exactly the member rows)."""
        ...


def for_logits(logits: torch.Tensor, kernel: WholeVocabSampler, torch_ops: WholeVocabSampler) -> WholeVocabSampler:
    """The kernel where it runs (fp32 on the CPU, compiler present), else torch ops."""
    return kernel if sampling_kernel.fits(logits) else torch_ops
