"""The fast sampling paths (engine/sampling/) against the plain reference sampler
(engine/sampling/reference.py): greedy choices and penalised logits equal to the bit, top-k draws
equal for the same uniform, and every mode's distribution the reference's."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from engine_util import one_thread
from llamaserve.engine.request import SamplingParams
from llamaserve.engine.sampling import Sampler
from llamaserve.engine.sampling import reference
from llamaserve.engine.sampling.sampler import SAMPLER_ENV
from llamaserve.kernels import sampling as sampling_kernel

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

V = 512


@pytest.fixture(params=["kernel", "torch", "device"])
def whole_vocab_path(request, monkeypatch):
    """The host sampler's whole-vocabulary kernel and torch ops, and the device sampler."""
    monkeypatch.setenv(SAMPLER_ENV, "device" if request.param == "device" else "host")
    if request.param == "torch":
        monkeypatch.setattr(sampling_kernel, "fits", lambda logits: False)
    elif request.param == "kernel" and not sampling_kernel.fits(torch.zeros(1)):
        pytest.skip("no C++ compiler for the sampling kernel")
    return request.param


def peaked_logits(rows: int, seed: int) -> torch.Tensor:
    """Random rows where a few dozen tokens hold nearly all the mass (so frequencies are testable)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 2.5


PENALTIES = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)


def test_greedy_and_penalised_logits_equal_the_reference_to_the_bit():
    logits = peaked_logits(6, seed=1)
    s = Sampler(V)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, **PENALTIES),
              SamplingParams(temperature=0, repetition_penalty=2.0)] * 2
    prompts = [[1, 2, 3], torch.topk(logits[1], 20).indices.tolist(), torch.topk(logits[2], 3).indices.tolist()] * 2
    states = [s.start(p, prompt) for p, prompt in zip(params, prompts)]
    for st in states[3:]:  # rows that have also generated some of their tokens
        if st.seen is not None:
            for t in list(st.seen)[:5]:
                st.seen[t] += 2
    penalised = s.penalized_logits(logits.clone(), states)
    for j, st in enumerate(states):
        assert torch.equal(penalised[j], reference.penalize(logits[j], st.params, st.seen)), j
    seen_before = [dict(st.seen) if st.seen is not None else None for st in states]
    tokens, _ = s.sample(logits.clone(), states)
    assert tokens == [reference.greedy(logits[j], params[j], seen_before[j]) for j in range(6)]


def test_top_k_draws_equal_the_reference_for_the_same_uniform():
    # Top-k rows take one uniform per draw from the request's stream: the reference's inverse
    # CDF with that uniform picks the same token (up to float32 rounding at a boundary).
    logits = peaked_logits(1, seed=2)[0]
    kinds = [dict(top_k=20), dict(top_k=20, top_p=0.8), dict(top_k=50, min_p=0.05, temperature=0.7)]
    for kind in kinds:
        params = [SamplingParams(seed=i, **{"temperature": 1.0, **kind}) for i in range(400)]
        s = Sampler(V)
        tokens, _ = s.sample(logits.expand(400, -1).clone(), [s.start(p, [1]) for p in params])
        want = [reference.sample(logits, p, random.Random(p.seed).random()) for p in params]
        mismatches = sum(a != b for a, b in zip(tokens, want))
        assert mismatches <= 2, (kind, mismatches)


MODES = [
    dict(),  # temperature only: the whole vocabulary
    dict(temperature=0.6),
    dict(top_p=0.7),
    dict(min_p=0.1),
    dict(top_p=0.9, min_p=0.02, temperature=1.3),
    dict(top_k=8, top_p=0.9),
    dict(**PENALTIES),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "plain")
def test_every_mode_samples_the_reference_distribution(mode, whole_vocab_path):
    logits = peaked_logits(1, seed=3)[0]
    n = 3000
    prompt = torch.topk(logits, 10).indices.tolist()  # penalties push the favourites down
    params = [SamplingParams(seed=i, **{"temperature": 1.0, **mode}) for i in range(n)]
    s = Sampler(V)
    states = [s.start(p, prompt) for p in params]
    seen = dict(states[0].seen) if states[0].seen is not None else None
    tokens, _ = s.sample(logits.expand(n, -1).clone(), states)
    probs = reference.probabilities(logits, params[0], seen)
    counts = Counter(tokens)
    assert all(probs[t] > 0 for t in counts), "a token outside the reference's support was sampled"
    stat, dof = chi_square(counts, probs, n)
    # Far in the tail of chi-square(dof) (mean dof, sd sqrt(2 dof)): a wrong temperature, a
    # missed penalty or a misplaced nucleus gives hundreds to thousands.
    assert stat < dof + 5 * (2 * dof) ** 0.5, (mode, stat, dof)


def chi_square(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over tokens expected at least 5 times, the rest pooled in one bin."""
    expected = (probs * n).tolist()
    big = [t for t in range(len(expected)) if expected[t] >= 5]
    rest_e = n - sum(expected[t] for t in big)
    rest_o = n - sum(counts.get(t, 0) for t in big)
    stat = sum((counts.get(t, 0) - expected[t]) ** 2 / expected[t] for t in big)
    bins = len(big)
    if rest_e >= 5:
        stat += (rest_o - rest_e) ** 2 / rest_e
        bins += 1
    return stat, max(1, bins - 1)


def test_the_reference_itself_on_a_distribution_worked_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    p = reference.probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(p, torch.tensor([2 / 3, 1 / 3, 0, 0], dtype=torch.float64))
    p = reference.probabilities(logits, SamplingParams(temperature=1.0, min_p=0.25))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.25, 0.15, 0], dtype=torch.float64) / 0.9)
    p = reference.probabilities(logits, SamplingParams(temperature=1.0, top_k=1))
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]
    probs = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)  # drawn most likely first, ties by id
    assert [reference.draw(probs, u) for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99)] == [1, 1, 0, 0, 2, 2]
