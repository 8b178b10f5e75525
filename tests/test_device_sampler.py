"""The device sampler (engine/sampling/on_device.py, GPUs' default): counter-based uniforms,
the kept weights against the reference's distribution, row independence whatever the batch
needs, one whole compiled graph (no host synchronisation), and an engine that samples with it
alone as in a crowd. Its sampled distributions are also tested with the host sampler's tests
(test_sampler.py, test_sampling_reference.py: the "device" parameter)."""

from __future__ import annotations

import random

import pytest
import torch

from engine_util import make_engine, one_thread, random_tokens, tiny_model
from llamaserve.engine.request import SamplingParams
from llamaserve.engine.sampling import Sampler, reference
from llamaserve.engine.sampling.counter_uniforms import seed_key, uniform_bits, uniforms
from llamaserve.engine.sampling.on_device import SORT, DeviceDraws, device_tokens, kept_weights, rank_filter_for
from llamaserve.engine.sampling.sampler import SAMPLER_ENV

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

V = 512


def lowbias32(x: int) -> int:
    """The mixer as published, on Python's unbounded ints (the library splits its products)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_counter_uniforms_are_the_published_mixer_on_any_input():
    rng = random.Random(0)
    keys = [0, 1, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(200)]
    draws = [0, 1, 2**32 + 5] + [rng.getrandbits(40) for _ in range(200)]
    want = [lowbias32(lowbias32(k ^ (d & 0xFFFFFFFF)) ^ 0x9E3779B9) for k, d in zip(keys, draws)]
    assert [uniform_bits(k, d) for k, d in zip(keys, draws)] == want
    got = uniform_bits(torch.tensor(keys), torch.tensor(draws)).tolist()
    assert got == want  # int64 tensors: the same bits, no overflow
    u = uniforms(torch.tensor(keys), torch.tensor(draws))
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    assert u.tolist() == [((w >> 9) + 0.5) / 2**23 for w in want]


def test_counter_uniforms_are_uniform_and_streams_differ():
    n = 40_000
    u = uniforms(torch.full((n,), seed_key(42)), torch.arange(n))
    counts = torch.histc(u, bins=20, min=0, max=1)
    chi2 = float(((counts - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < 19 + 5 * (2 * 19) ** 0.5  # chi-square, 19 degrees of freedom
    # Neighbouring draws are not correlated, and seeds differing only in their high half differ.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02
    assert seed_key(5) != seed_key(5 + (1 << 32)) and seed_key(-1) == seed_key((1 << 64) - 1)
    a = uniforms(torch.full((100,), seed_key(1)), torch.arange(100))
    b = uniforms(torch.full((100,), seed_key(2)), torch.arange(100))
    assert int((a == b).sum()) <= 1


KINDS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, top_k=50, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=10, top_p=0.6, min_p=0.1),
    dict(temperature=1.0, top_k=V + 5),  # more than the vocabulary: no filter
]


def weights_of(x: torch.Tensor, params: list[SamplingParams], rank_filter: int | None = None) -> torch.Tensor:
    t = torch.tensor([p.temperature for p in params])[:, None]
    return kept_weights(x / t, torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params], dtype=torch.float64),
                        torch.tensor([p.min_p for p in params]),
                        rank_filter_for(params) if rank_filter is None else rank_filter)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_kept_weights_are_the_reference_distribution(scale):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(KINDS), V, generator=g) * scale
    params = [SamplingParams(**k) for k in KINDS]
    w = weights_of(x, params).double()  # the whole rows sorted (top-p rows)
    # Without the top-p rows: top-k through torch.topk.
    no_top_p = [j for j, p in enumerate(params) if p.top_p == 1.0]
    assert rank_filter_for([params[j] for j in no_top_p]) == V + 5
    w[no_top_p] = weights_of(x[no_top_p], [params[j] for j in no_top_p]).double()
    for j, p in enumerate(params):
        want = reference.probabilities(x[j], p)
        got = w[j] / w[j].sum()
        assert torch.equal(got > 0, want > 0), (p, int((got > 0).sum()), int((want > 0).sum()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_ties_at_the_top_k_and_top_p_thresholds_are_kept_like_the_reference():
    x = torch.full((2, V), -20.0)
    x[:, :6] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5)]
    w = weights_of(x, params)
    assert (w[0] > 0).nonzero()[:, 0].tolist() == [0, 1, 2, 3]  # the k-th's equals stay
    assert torch.equal(w[1] > 0, reference.probabilities(x[1], params[1]) > 0)


def test_rows_keep_the_same_weights_whatever_the_batch_needs():
    # No rank filter, top-k by torch.topk, or the whole row sorted (a top-p row elsewhere in the
    # batch): a row's weights are the same bits.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, V, generator=g) * 2
    plain = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, min_p=0.1)] * 3
    assert torch.equal(weights_of(x, plain, 0), weights_of(x, plain, SORT))
    assert torch.equal(weights_of(x, plain, 0), weights_of(x, plain, 50))
    top_k = [SamplingParams(temperature=1.0, top_k=20), SamplingParams(temperature=0.7, top_k=3, min_p=0.2)] * 3
    assert rank_filter_for(top_k) == 20 and rank_filter_for(top_k + [SamplingParams(top_p=0.9)]) == SORT
    assert torch.equal(weights_of(x, top_k, 20), weights_of(x, top_k, SORT))
    assert torch.equal(weights_of(x, top_k, 20), weights_of(x, top_k, 64))
    assert int((weights_of(x, top_k, 20)[0] > 0).sum()) == 20


def test_infinite_and_nan_logits_give_a_token_in_range():
    x = torch.randn(3, V)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    for sort in (0, 5, SORT):
        t = device_tokens(x, torch.ones(3), torch.zeros(3, dtype=torch.long), torch.full((3,), 0.9, dtype=torch.float64),
                          torch.zeros(3), torch.arange(3), torch.zeros(3, dtype=torch.long), sort)
        assert t[1] == 5 and bool(((t >= 0) & (t < V)).all())


def crowd_params(n: int, seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    return [SamplingParams(seed=rng.getrandbits(64), **rng.choice(KINDS + [dict(temperature=0)])) for _ in range(n)]


@pytest.mark.parametrize("rows", [None, 16])
def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_crowd(rows, monkeypatch):
    monkeypatch.setenv(SAMPLER_ENV, "device")
    g = torch.Generator().manual_seed(9)
    steps = 12
    logits = [torch.randn(10, V, generator=g) * 1.5 for _ in range(steps)]
    probes = [SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=8),
              SamplingParams(temperature=1.0, top_k=5, seed=9), SamplingParams(temperature=0)]
    for probe in probes:
        alone = Sampler(V, rows=rows)
        st = alone.start(probe, [1])
        solo = [alone.sample(step[:1].clone(), [st])[0][0] for step in logits]
        # Crowds that need the sorted pass or not (greedy and plain rows only), of varying sizes.
        for crowd_seed, size in ((1, 10), (2, 6), (3, 3)):
            others = crowd_params(size - 1, crowd_seed)
            if crowd_seed == 3:
                others = [SamplingParams(temperature=0), SamplingParams(temperature=1.2, seed=1)]
            s = Sampler(V, rows=rows)
            states = [s.start(p, [1]) for p in others]
            at = crowd_seed % size  # the probe's row: first, in the middle, last
            states.insert(at, s.start(probe, [1]))
            together = []
            for step in logits:
                x = torch.cat([step[1:at + 1], step[:1], step[at + 1:size]])
                together.append(s.sample(x.clone(), states)[0][at])
            assert together == solo, (probe, crowd_seed)


def test_a_request_restarted_with_its_seed_draws_the_same_tokens():
    # No state but (seed, draw number): a sampler rebuilt mid-stream continues the sequence.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, V, generator=g)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    draws = DeviceDraws()
    s = Sampler(V)
    st = s.start(params, [1])
    first = [int(draws.sample(logits[i : i + 1], [st])[0]) for i in range(8)]
    st2 = s.start(params, [1])
    st2.draws = 4
    assert [int(draws.sample(logits[i : i + 1], [st2])[0]) for i in range(4, 8)] == first[4:]
    assert st.draws == 8


@pytest.mark.parametrize("rank_filter", [0, 40, SORT])
def test_the_device_sampler_compiles_whole_and_gives_the_eager_tokens(rank_filter):
    # fullgraph=True fails on any graph break: a .item(), a bool() of a tensor, a host sync.
    g = torch.Generator().manual_seed(6)
    n = 8
    x = torch.randn(n, V, generator=g) * 2
    params = crowd_params(n, 5)
    args = (x, torch.tensor([p.temperature for p in params]), torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params], dtype=torch.float64), torch.tensor([p.min_p for p in params]),
            torch.tensor([seed_key(p.seed) for p in params]), torch.arange(n), rank_filter)
    compiled = torch.compile(device_tokens, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*args), device_tokens(*args))


def test_the_engine_samples_on_the_device_sampler_alike_alone_and_in_a_crowd(monkeypatch):
    monkeypatch.setenv(SAMPLER_ENV, "device")
    model = tiny_model()
    probe = SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True)

    def run(background: int) -> list[int]:
        engine = make_engine(model, max_users=6)
        assert engine.sampler.device_draws is not None and engine.sampler.device_draws.rows == 6
        for i in range(background):
            kind = [dict(temperature=1.0, top_p=0.8), dict(temperature=0), dict(temperature=1.1, top_k=7)][i % 3]
            engine.add_request(f"bg{i}", random_tokens(5 + 7 * i, i), SamplingParams(max_tokens=4 + 3 * i, seed=i, ignore_eos=True, **kind))
        engine.add_request("probe", random_tokens(30, 99), probe)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens["probe"]

    alone = run(0)
    assert len(alone) == 12 and run(7) == alone


def test_an_unknown_sampler_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(SAMPLER_ENV, "gpu")
    with pytest.raises(ValueError, match="LLAMASERVE_SAMPLER must be 'host' or 'device', got 'gpu'"):
        Sampler(V)
