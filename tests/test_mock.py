"""The mock model: same forward interface as Transformer, deterministic, end-of-turn every 10th
generated token, and it runs through the real Engine unchanged."""

from __future__ import annotations

import torch

from llamaserve.config import BUILTIN_MODEL_ARGS
from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.engine.request import FinishReason, SamplingParams
from llamaserve.model.mock import LLAMA3_EOT_ID, MockTransformer


def greedy(model, cache, prompt: list[int], slot: int, n: int) -> list[int]:
    logits = model(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([slot]), cache)
    out = [int(logits.argmax(-1))]
    for _ in range(n - 1):
        pos = len(prompt) + len(out) - 1
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]), torch.tensor([slot]), cache)
        out.append(int(logits.argmax(-1)))
    return out


def test_forward_shapes_determinism_and_end_of_turn():
    model = MockTransformer()
    cache = model.new_cache(4, 64)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    last = model(tokens, torch.tensor([0, 0]), torch.tensor([0, 1]), cache)
    every = model(tokens, torch.tensor([0, 0]), torch.tensor([2, 3]), cache, all_logits=True)
    assert last.shape == (2, BUILTIN_MODEL_ARGS.vocab_size) and last.dtype == torch.float32
    assert every.shape == (2, 3, BUILTIN_MODEL_ARGS.vocab_size)
    assert torch.equal(every[:, -1], last)

    a = greedy(model, cache, [1, 2, 3], 0, 25)
    assert a == greedy(model, cache, [1, 2, 3], 1, 25)  # deterministic, whatever the slot
    assert a != greedy(model, cache, [4, 2, 3], 2, 25)  # depends on the whole prompt, not only its end
    assert [i + 1 for i, t in enumerate(a) if t == LLAMA3_EOT_ID] == [10, 20]
    assert all(t < 128000 for t in a if t != LLAMA3_EOT_ID)  # ordinary text tokens


def test_chunked_prefill_gives_the_same_continuation():
    model = MockTransformer()
    cache = model.new_cache(2, 64)
    prompt = list(range(100, 120))
    whole = greedy(model, cache, prompt, 0, 12)
    model(torch.tensor([prompt[:8]]), torch.tensor([0]), torch.tensor([1]), cache)
    logits = model(torch.tensor([prompt[8:]]), torch.tensor([8]), torch.tensor([1]), cache)
    assert int(logits.argmax(-1)) == whole[0]


def test_step_delay_and_cache_bound():
    model = MockTransformer(step_delay=0.05)
    cache = model.new_cache(1, 8)
    import time

    t0 = time.perf_counter()
    model(torch.tensor([[1, 2]]), torch.tensor([0]), torch.tensor([0]), cache)
    assert time.perf_counter() - t0 >= 0.05
    try:
        model(torch.tensor([[1, 2]]), torch.tensor([7]), torch.tensor([0]), cache)
    except ValueError as exc:
        assert "cache length 8" in str(exc)
    else:
        raise AssertionError("a position past the cache must be refused")


def test_runs_through_the_real_engine():
    from llamaserve.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    engine = Engine(MockTransformer(), tok, EngineConfig(max_users=4, max_seq_len=128))
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    engine.add_request("a", ids, SamplingParams(max_tokens=50, temperature=0))
    engine.add_request("b", ids, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].finish_reason == FinishReason.STOP and finished["a"].completion_tokens == 10
    assert finished["b"].finish_reason == FinishReason.LENGTH and finished["b"].completion_tokens == 50
