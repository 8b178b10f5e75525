"""Sampler: each feature, its statistics under a fixed seed, and row independence."""

import math
from collections import Counter

import pytest
import torch

from llamaserve.engine.request import SamplingParams
from engine_util import one_thread

from llamaserve.engine.sampling import Sampler, fast_argmax, fast_topk
from llamaserve.engine.sampling.nucleus import nucleus_weights as _nucleus_weights
from llamaserve.engine.sampling.sampler import SAMPLER_ENV
from llamaserve.kernels import sampling as sampling_kernel

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

V = 512


@pytest.fixture(params=["kernel", "torch", "device"])
def whole_vocab_path(request, monkeypatch):
    """Whole-vocabulary rows on the compiled kernel (CPU), on the torch ops (other devices),
    and every sampled row on the device sampler (GPUs' default: on_device.py)."""
    monkeypatch.setenv(SAMPLER_ENV, "device" if request.param == "device" else "host")
    if request.param == "torch":
        monkeypatch.setattr(sampling_kernel, "fits", lambda logits: False)
    elif request.param == "kernel" and not sampling_kernel.fits(torch.zeros(1)):
        pytest.skip("no C++ compiler for the sampling kernel")
    return request.param


@pytest.fixture(params=["host", "device"])
def sampler_kind(request, monkeypatch):
    """The host sampler (grouped rows, random.Random) and the device sampler."""
    monkeypatch.setenv(SAMPLER_ENV, request.param)
    return request.param


def sampler(vocab=V):
    return Sampler(vocab)


def draw_many(logits_row, params_fn, n, vocab=V):
    """n independent requests (seeds 0..n-1) on the same logits row, in one batch."""
    s = sampler(vocab=vocab)
    states = [s.start(params_fn(i), [1]) for i in range(n)]
    tokens, _ = s.sample(logits_row.expand(n, -1).clone(), states)
    return tokens


def logits_from_probs(probs):
    """[V] logits whose softmax is `probs` padded with near-zero mass."""
    x = torch.full((V,), -30.0)
    x[: len(probs)] = torch.tensor(probs).log()
    return x


def test_fast_topk_and_argmax_match_torch():
    g = torch.Generator().manual_seed(0)
    for vocab in (V, 128256, 1000):
        x = torch.randn(5, vocab, generator=g)
        for k in (1, 7, 50):
            vals, ids = fast_topk(x, k)
            ref_vals, _ = torch.topk(x, k)
            assert torch.equal(vals, ref_vals)
            assert torch.equal(x.gather(1, ids), vals)
        assert torch.equal(fast_argmax(x), x.argmax(-1))
        col = x.t().contiguous().t()  # column-major, as the model's CPU head returns it
        assert torch.equal(fast_argmax(col), x.argmax(-1))
        for k in (1, 10):
            vals, ids = fast_topk(col, k)
            assert torch.equal(vals, torch.topk(x, k).values) and torch.equal(x.gather(1, ids), vals)
    # Column-major logits (a head computed as weight @ h^T) give the same answers.
    x = torch.randn(V, 20, generator=g)
    assert torch.equal(fast_argmax(x.t()), x.t().contiguous().argmax(-1))
    ties = torch.zeros(2, V)
    ties[0, [300, 40]] = 1.0
    ties[1, [511, 0]] = 2.0
    assert fast_argmax(ties).tolist() == [40, 0]  # first maximum, like argmax
    assert fast_argmax(ties.t().contiguous().t()).tolist() == [40, 0]


def test_greedy_is_argmax_and_top_k_1_equals_greedy(sampler_kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=g)
    s = sampler()
    greedy, _ = s.sample(logits, [s.start(SamplingParams(temperature=0), [1]) for i in range(6)])
    assert greedy == logits.argmax(-1).tolist()
    for seed in range(5):
        states = [s.start(SamplingParams(temperature=1.3, top_k=1, seed=seed), [1]) for i in range(6)]
        top1, _ = s.sample(logits, states)
        assert top1 == greedy


def test_seed_reproducible_and_different_seeds_differ(whole_vocab_path):
    logits = torch.zeros(V)  # uniform: every draw is pure randomness

    def run(seed):
        s = sampler()
        st = s.start(SamplingParams(temperature=1.0, seed=seed), [1])
        return [s.sample(logits[None].clone(), [st])[0][0] for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_sampling_matches_softmax_frequencies(whole_vocab_path):
    probs = [0.6, 0.3, 0.1]
    n = 3000
    tokens = draw_many(logits_from_probs(probs), lambda i: SamplingParams(temperature=1.0, seed=i), n)
    counts = Counter(tokens)
    assert set(counts) <= {0, 1, 2}
    for t, p in enumerate(probs):
        assert abs(counts[t] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    # Temperature 0.5 squares and renormalises: 0.36 : 0.09 : 0.01.
    cold = Counter(draw_many(logits_from_probs(probs), lambda i: SamplingParams(temperature=0.5, seed=i), n))
    assert abs(cold[0] / n - 0.36 / 0.46) < 0.03


def test_top_k_only_samples_the_k_most_likely(sampler_kind):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(V, generator=g) * 0.1  # flat: without top-k any token is likely
    top5 = set(torch.topk(logits, 5).indices.tolist())
    tokens = draw_many(logits, lambda i: SamplingParams(temperature=1.0, top_k=5, seed=i), 2000)
    assert set(tokens) == top5


def test_top_p_never_samples_outside_the_nucleus(whole_vocab_path):
    # Nucleus at top_p 0.75: tokens 0 (0.5) and 1 (0.3); token 2 starts at cumulative 0.8.
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 3000
    tokens = draw_many(logits_from_probs(probs), lambda i: SamplingParams(temperature=1.0, top_p=0.75, seed=i), n)
    counts = Counter(tokens)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / n - 0.5 / 0.8) < 0.03


def test_top_p_on_a_flat_distribution(whole_vocab_path):
    # 400 equally likely tokens then a tail: the nucleus at 0.9 has all 400 (ties at the
    # threshold are kept), and nothing of the tail.
    logits = torch.full((V,), -40.0)
    logits[:400] = 0.0
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    logits = logits[perm]
    flat = set(perm.argsort()[:400].tolist())  # where the 400 ended up
    tokens = draw_many(logits, lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=i), 2000)
    assert set(tokens) <= flat
    assert len(set(tokens)) > 300


def test_top_p_large_nucleus_is_exact(whole_vocab_path):
    # Slowly decaying, all distinct: the nucleus at 0.8 has hundreds of tokens.
    ranks = torch.arange(V, dtype=torch.float32)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(6))
    logits = (-ranks / 300.0)[perm.argsort()]  # token perm[r] has rank r
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = set(order[(sorted_p.cumsum(0) - sorted_p) < 0.8].tolist())
    assert len(nucleus) > 256
    tokens = draw_many(logits, lambda i: SamplingParams(temperature=1.0, top_p=0.8, seed=i), 3000)
    assert set(tokens) <= nucleus
    rank_of = {t: r for r, t in enumerate(order.tolist())}
    assert max(rank_of[t] for t in tokens) > 256
    # Mass check: tokens of the first half of the nucleus get their renormalised share.
    first_half = {t for t in nucleus if rank_of[t] < len(nucleus) // 2}
    share = sorted_p[: len(nucleus) // 2].sum() / sorted_p[: len(nucleus)].sum()
    assert abs(sum(t in first_half for t in tokens) / 3000 - share.item()) < 0.03


def test_top_p_within_top_k_like_the_original(sampler_kind):
    probs = [0.4, 0.3, 0.2, 0.1]
    tokens = draw_many(logits_from_probs(probs), lambda i: SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=i), 2000)
    # Renormalised over the top 3: 0.444, 0.333, 0.222 -> nucleus 0.5 is tokens 0 and 1.
    assert set(tokens) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_top(whole_vocab_path):
    probs = [0.5, 0.3, 0.12, 0.08]
    tokens = draw_many(logits_from_probs(probs), lambda i: SamplingParams(temperature=1.0, min_p=0.2, seed=i), 2000)
    assert set(tokens) == {0, 1, 2}  # 0.08 < 0.2 * 0.5


def test_penalties_follow_their_definitions(sampler_kind):
    s = sampler()
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    state = s.start(params, prompt_token_ids=[10, 11])
    logits = torch.zeros(1, V)
    logits[0, 10] = 4.0  # in the prompt, positive: divided
    logits[0, 11] = -4.0  # in the prompt, negative: multiplied
    logits[0, 12] = 8.0  # the greedy choice twice: then generated, with count 2
    logits[0, 13] = 3.1  # never seen: untouched
    assert s.sample(logits.clone(), [state])[0] == [12]
    assert s.sample(logits.clone(), [state])[0] == [12]
    out = s.penalized_logits(logits.clone(), [state])[0]
    assert out[10].item() == pytest.approx(2.0)
    assert out[11].item() == pytest.approx(-8.0)
    assert out[12].item() == pytest.approx(8.0 / 2.0 - 0.5 - 0.25 * 2)
    assert out[13].item() == pytest.approx(3.1) and out[0].item() == 0.0
    # The penalised logits decide: token 13 now beats the repeated token 12.
    assert s.sample(logits.clone(), [state])[0] == [13]
    # A new request starts from clean counts.
    fresh = s.start(params, prompt_token_ids=[1])
    assert s.penalized_logits(logits.clone(), [fresh])[0][12].item() == 8.0


def test_frequency_penalty_shifts_the_sampled_distribution(sampler_kind):
    # Two equally likely tokens; after token 0 was generated 4 times with frequency 0.5 its
    # logit drops by 2: the odds become e^-2.
    s = sampler()
    st = s.start(SamplingParams(temperature=0, frequency_penalty=0.5), [5])
    logits = torch.full((1, V), -50.0)
    logits[0, :2] = 0.0
    for _ in range(4):
        only0 = logits.clone()
        only0[0, 1] = -60.0
        s.sample(only0, [st])
    out = s.penalized_logits(logits.clone(), [st])[0]
    p = torch.softmax(out, -1)
    assert p[0].item() / p[1].item() == pytest.approx(math.exp(-2.0), rel=1e-5)


def test_logprobs_with_top_alternatives(sampler_kind):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, V, generator=g)
    s = sampler()
    states = [s.start(SamplingParams(temperature=0, logprobs=3), [1]), s.start(SamplingParams(temperature=0), [1])]
    tokens, lps = s.sample(logits.clone(), states)
    ref = torch.log_softmax(logits[0], -1)
    assert lps[1] is None
    assert lps[0].token_id == tokens[0] and lps[0].logprob == pytest.approx(ref[tokens[0]].item())
    assert [t for t, _ in lps[0].top] == torch.topk(ref, 3).indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(torch.topk(ref, 3).values.tolist())


@pytest.mark.parametrize("vocab, threads", [(V, 1), (128256, 1), (128256, 2)])
def test_each_row_is_independent_of_the_rest_of_the_batch(vocab, threads, whole_vocab_path):
    """Alone or among others with different parameters: bit-identical tokens and logprobs,
    also when torch may split a long row's work across threads."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(5)
    n = 12
    # Sharper rows on the large vocabulary keep top-p on its candidate path ...
    logits = torch.randn(n, vocab, generator=g) * (3 if vocab == V else 10)
    logits[4:6] *= 0.02  # flat rows: top-p / min-p reach past the candidates (bisection path)
    kinds = [
        dict(temperature=0),
        dict(temperature=0.8),
        dict(temperature=1.0, top_k=10),
        dict(temperature=1.0, top_k=10, top_p=0.7),
        dict(temperature=0.9, top_p=0.9),
        dict(temperature=0.9, min_p=0.05),
        dict(temperature=1.0, top_k=40, repetition_penalty=1.5, frequency_penalty=0.3),
        dict(temperature=0, presence_penalty=1.0),
    ]
    params = [SamplingParams(seed=100 + i, logprobs=2, **kinds[i % len(kinds)]) for i in range(n)]
    prompt = [1, 2, 3]

    s = sampler(vocab=vocab)
    states = [s.start(p, prompt) for p in params]
    batch_tokens, batch_lp = [], []
    for _ in range(3):
        t, lp = s.sample(logits.clone(), states)
        batch_tokens.append(t)
        batch_lp.append(lp)

    # The same batch handed over column-major (as the model's head may produce it).
    s2 = sampler(vocab=vocab)
    states2 = [s2.start(p, prompt) for p in params]
    col_major = logits.t().contiguous().t()
    assert s2.sample(col_major.clone(), states2)[0] == batch_tokens[0]
    # Without logprobs, top-k rows read the column-major logits in place: same tokens.
    tk = [SamplingParams(temperature=1.0, top_k=10, seed=i) for i in range(n)]
    s3, s4 = sampler(vocab=vocab), sampler(vocab=vocab)
    assert s3.sample(col_major.clone(), [s3.start(p, prompt) for p in tk])[0] == s4.sample(
        logits.clone(), [s4.start(p, prompt) for p in tk])[0]

    for i in range(n):
        alone = sampler(vocab=vocab)
        st = alone.start(params[i], prompt)
        for step in range(3):
            t, lp = alone.sample(logits[i : i + 1].clone(), [st])
            assert t[0] == batch_tokens[step][i], (i, step)
            assert lp[0].logprob == batch_lp[step][i].logprob
            assert lp[0].top == batch_lp[step][i].top


def _nucleus_by_sorting(probs: torch.Tensor, top_p: float) -> set[int]:
    """Reference: tokens whose strictly-more-likely mass is below top_p (ties kept)."""
    out = set()
    for t in range(probs.numel()):
        if probs[probs > probs[t]].sum().item() < top_p * probs.sum().item():
            out.add(t)
    return out


def test_exact_nucleus_search_is_batch_invariant_and_exact():
    g = torch.Generator().manual_seed(7)
    e = torch.exp(torch.randn(6, V, generator=g) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0, 3.0])[:, None])
    e[3, :40] = e[3, :40].max()  # ties at the top
    params = [SamplingParams(temperature=1.0, top_p=tp) for tp in (0.9, 0.5, 0.95, 0.3, 0.7, 0.99)]
    batch = _nucleus_weights(e, params)
    for j in range(6):
        alone = _nucleus_weights(e[j : j + 1].clone(), params[j : j + 1])
        assert torch.equal(alone[0], batch[j])
        kept = set((batch[j] > 0).nonzero()[:, 0].tolist())
        assert kept == _nucleus_by_sorting(e[j].double(), params[j].top_p)


@pytest.mark.parametrize("vocab", [V, 128256])
def test_refused_draws_fall_back_to_the_exact_search_and_stay_row_independent(vocab, whole_vocab_path):
    # Flat rows with a large min-p (few tokens pass) and a tiny top-p: draws from the whole
    # distribution are nearly always refused, so rows end in the exact search.
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, vocab, generator=g) * 0.3
    kinds = [dict(min_p=0.9), dict(top_p=0.01), dict(top_p=0.9), dict(), dict(min_p=0.9, top_p=0.5), dict(top_p=0.02)]
    params = [SamplingParams(temperature=1.0, seed=50 + j, **kinds[j]) for j in range(6)]
    s = sampler(vocab)
    states = [s.start(p, [1]) for p in params]
    batch = [s.sample(logits.clone(), states)[0] for _ in range(4)]
    for j in range(6):
        alone = sampler(vocab)
        st = alone.start(params[j], [1])
        assert [alone.sample(logits[j : j + 1].clone(), [st])[0][0] for _ in range(4)] == [b[j] for b in batch]
    probs = torch.softmax(logits.double(), -1)
    for j in (0, 4):
        allowed = set((probs[j] >= 0.9 * probs[j].max()).nonzero()[:, 0].tolist())
        assert all(b[j] in allowed for b in batch)
    for j in (1, 5):
        nucleus = _nucleus_by_sorting(probs[j], params[j].top_p) if vocab == V else None
        if nucleus is not None:
            assert all(b[j] in nucleus for b in batch)


def test_extreme_logits_and_temperatures_are_redone_with_the_max_subtracted(whole_vocab_path):
    # exp(x / T) without the max would overflow (x / T = 2000) or lose every token (-2000);
    # those rows are redone and must sample like the well-scaled row, in any batch.
    base = logits_from_probs([0.5, 0.3, 0.2])
    rows = torch.stack([base + 200.0, base - 200.0, base, base * 1.0])
    temps = [0.1, 0.1, 1.0, 1.0]
    n = 3000
    for j, shift in ((0, 200.0), (1, -200.0)):
        x = torch.full((V,), -30.0 / temps[j])
        x[:3] = torch.tensor([0.5, 0.3, 0.2]).log() + shift
        tokens = draw_many(x, lambda i: SamplingParams(temperature=1.0, top_p=0.95, seed=i), n)
        counts = Counter(tokens)
        assert set(counts) <= {0, 1, 2} and abs(counts[0] / n - 0.5) < 0.04
    params = [SamplingParams(temperature=t, top_p=0.9, seed=j) for j, t in enumerate(temps)]
    s = sampler()
    states = [s.start(p, [1]) for p in params]
    batch = [s.sample(rows.clone(), states)[0] for _ in range(3)]
    for j in range(4):
        alone = sampler()
        st = alone.start(params[j], [1])
        assert [alone.sample(rows[j : j + 1].clone(), [st])[0][0] for _ in range(3)] == [b[j] for b in batch]


def test_whole_vocabulary_rows_write_their_weights_over_the_logits(monkeypatch):
    # The engine's case (every row, row-major): exp(x / T) goes over the batch's own logits, no
    # second [n, V] buffer; a row whose max x / T is out of range has its maximum subtracted first.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, V, generator=g)
    x[1] += 70.0  # max x / T above 64: shifted (exp(70) alone would still be finite)
    x[2] -= 40.0  # below -30: shifted
    for on_kernel in (True, False):
        if not on_kernel:  # the torch path (off the CPU, or no compiler): its exact numbers
            monkeypatch.setattr(sampling_kernel, "fits", lambda logits: False)
        logits = x.clone()
        s = sampler()
        s.sample(logits, [s.start(SamplingParams(temperature=1.0, top_p=0.9, seed=j), [1]) for j in range(3)])
        assert 0 not in s.rows.buffers
        for j in range(3):  # weights proportional to exp(x), the largest 1 where the max is subtracted
            torch.testing.assert_close(logits[j] / logits[j].max(), torch.exp(x[j] - x[j].max()), rtol=2e-6, atol=0)
        if not on_kernel:
            assert torch.equal(logits[0], torch.exp(x[0]))
            for j in (1, 2):
                assert torch.equal(logits[j], torch.exp(x[j] - x[j].max()))


def _mass_above(e: torch.Tensor, v: float) -> float:
    return e[e > v].double().sum().item()


def test_nucleus_test_reads_only_what_it_needs_and_answers_like_the_whole_row(monkeypatch):
    # Flat rows as the benchmark model gives them: a draw well inside the nucleus is decided from
    # the first segment, one outside it reads the whole row; answers equal a whole-row sum's.
    import llamaserve.engine.sampling.whole_torch as sampler_module

    vocab, c = 128256, 256
    g = torch.Generator().manual_seed(10)
    e = torch.exp(torch.randn(2, vocab, generator=g) * 0.55).view(2, vocab // c, c)
    mass = e.sum(-1)
    total = mass.double().cumsum(-1)[:, -1].tolist()
    s = sampler(vocab)
    calls = []
    real_threshold = torch.threshold
    monkeypatch.setattr(torch, "threshold", lambda *a, **k: calls.append(1) or real_threshold(*a, **k))
    flat = e.view(2, vocab)
    ranked = flat.sort(-1, descending=True).values
    for top_p in (0.9, 0.5):
        for q in (0.001, 0.3, 0.6, 0.8, 0.95, 0.999):  # the q-th most likely weight of each row
            values = [ranked[j, int(q * (vocab - 1))].item() for j in range(2)]
            expect = [_mass_above(flat[j], values[j]) < top_p * total[j] for j in range(2)]
            need = [(1 - top_p) * t for t in total]
            calls.clear()
            assert s.whole_torch.in_nucleus(e, mass, [0, 1], values, need) == expect
            if q == 0.001 and top_p == 0.9:  # a third of the mass is at or below it: enough
                assert len(calls) == 2
            if not any(expect):
                assert len(calls) == 2 * sampler_module.NUCLEUS_SEGMENTS
    # The early stop never changes an answer: the same with a single whole-row segment.
    values = [ranked[j, int(0.7 * (vocab - 1))].item() for j in range(2)]
    need = [(1 - 0.8) * t for t in total]
    staged = s.whole_torch.in_nucleus(e, mass, [0, 1], values, need)
    monkeypatch.setattr(sampler_module, "NUCLEUS_SEGMENTS", 1)
    assert s.whole_torch.in_nucleus(e, mass, [0, 1], values, need) == staged


def test_penalties_of_several_rows_each_follow_their_own_parameters_and_counts():
    # Rows with different penalties and different numbers of seen tokens, penalised together:
    # each row's logits are what its own definition gives.
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, V, generator=g) * 3
    s = sampler()
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.2),
        SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5),
    ]
    prompts = [[1, 2, 3], list(range(10, 60)), [7]]
    states = [s.start(p, prompt) for p, prompt in zip(params, prompts)]
    for st, generated in zip(states, ([4, 4], [10, 500, 500, 500], [])):
        for t in generated:
            st.seen[t] = st.seen.get(t, 0) + 1
    out = s.penalized_logits(logits.clone(), states)
    for j, (p, st) in enumerate(zip(params, states)):
        want = logits[j].clone()
        for t, count in st.seen.items():
            v = want[t].item()
            v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
            want[t] = v - p.presence_penalty * (count > 0) - p.frequency_penalty * count
        assert torch.allclose(out[j], want, atol=1e-6), j


def test_rows_with_infinite_or_nan_logits_take_their_arg_max_on_the_kernel():
    if not sampling_kernel.fits(torch.zeros(1)):
        pytest.skip("no C++ compiler for the sampling kernel")
    x = torch.randn(3, V)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    s = sampler()
    tokens, _ = s.sample(x.clone(), [s.start(SamplingParams(temperature=1.0, top_p=0.9, seed=j), [1]) for j in range(3)])
    assert tokens[1] == 5  # all the probability
    assert all(0 <= t < V for t in tokens)  # NaN: no distribution, but no error either


def test_a_draw_at_the_very_top_of_the_cdf_lands_on_a_column_with_weight():
    # u * total rounded up to the total (or past it) would land past the last column, or on the
    # zero-weight tail; a row without weight still gets a column in range.
    from llamaserve.engine.sampling.draw import pick

    w = torch.tensor([[0.2, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.1, 0.0, 0.4, 0.0]])
    cdf = w.cumsum(-1)
    targets = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0], [1.0, 1.5, 0.49], [0.5, 0.1, 0.0999]])
    assert pick(cdf, targets).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 0], [2, 2, 0]]
    assert pick(cdf.double(), targets.double()).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 0], [2, 2, 0]]
