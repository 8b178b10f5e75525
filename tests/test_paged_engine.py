"""Paged KV cache through the engine with a tiny real model: prefix caching (suffix-only prefill,
bit-identical tokens, multi-turn reuse), preemption (every request completes exactly as alone),
memory (more users than slots of the same bytes would allow, prompts beyond the pool refused)."""

import functools

import pytest
import engine_util
from engine_util import make_engine, one_thread, run_to_completion, tiny_model
from engine_util import random_tokens as tokens

from llamaserve.engine.request import InvalidRequest, SamplingParams

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
CHUNK = 32
# Requests one after the other on one engine (engine_util.run_in_turn), with this module's chunk.
run_in_turn = functools.partial(engine_util.run_in_turn, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def gib_for(model, blocks: int) -> float:
    return blocks * 16 * model.kv_bytes_per_token() / 2**30


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
SEEDED = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=1)
SYSTEM = tokens(100, seed=1)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_second_request_prefills_only_its_suffix_and_gets_the_same_bits(model, params):
    prompts = [SYSTEM + tokens(10, seed=2), SYSTEM + tokens(12, seed=3)]
    cached, engine = run_in_turn(model, prompts, params)
    stats = engine.stats()
    # The second prompt (112 tokens) takes the first 3 whole chunks (96 tokens) from the cache.
    assert stats["prefix_cache_hits"] == 96
    assert stats["prefix_cache_queries"] == 110 + 112
    assert stats["prefill_tokens"] == 110 + (112 - 96)
    plain, plain_engine = run_in_turn(model, prompts, params, prefix_cache=False)
    assert plain_engine.stats()["prefix_cache_hits"] == 0
    assert plain_engine.stats()["prefill_tokens"] == 110 + 112
    for rid in plain:
        assert cached[rid]["token_ids"] == plain[rid]["token_ids"]
        assert cached[rid]["logprobs"] == plain[rid]["logprobs"]  # the numbers, bit for bit


def test_users_arriving_together_compute_their_shared_system_prompt_once(model):
    prompts = {f"u{i}": SYSTEM + tokens(5 + i, seed=20 + i) for i in range(4)}
    results = {}
    for cache in (True, False):
        engine = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK, prefix_cache=cache)
        for rid, p in prompts.items():
            engine.add_request(rid, p, SEEDED)
        results[cache] = run_to_completion(engine)
        stats = engine.stats()
        total = sum(len(p) for p in prompts.values())
        assert stats["prefix_cache_hits"] == (3 * 96 if cache else 0)
        assert stats["prefill_tokens"] == total - stats["prefix_cache_hits"]
    for rid in prompts:
        assert results[True][rid]["logprobs"] == results[False][rid]["logprobs"]


def test_multi_turn_chat_reuses_the_previous_turn(model):
    turn1 = SYSTEM + tokens(30, seed=4)  # 130 tokens
    engine = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK)
    plain = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK, prefix_cache=False)
    for e in (engine, plain):
        e.add_request("t1", turn1, GREEDY)
    first = run_to_completion(engine)["t1"]
    assert run_to_completion(plain)["t1"]["token_ids"] == first["token_ids"]
    turn2 = turn1 + first["token_ids"] + tokens(20, seed=5)  # 166 tokens
    for e in (engine, plain):
        e.add_request("t2", turn2, GREEDY)
    second = run_to_completion(engine)["t2"]
    assert engine.stats()["prefix_cache_hits"] == 128  # turn 1's whole chunks
    assert second["token_ids"] == run_to_completion(plain)["t2"]["token_ids"]


def test_prompt_logprobs_are_never_served_from_the_cache(model):
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    prompts = [SYSTEM + tokens(10, seed=2), SYSTEM + tokens(10, seed=2)]
    cached, engine = run_in_turn(model, prompts, params)
    assert engine.stats()["prefix_cache_hits"] == 0
    assert cached["r0"]["token_ids"] == cached["r1"]["token_ids"]


def solo(model, prompt, params):
    engine = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK)
    engine.add_request("solo", prompt, params)
    return run_to_completion(engine)["solo"]


def test_a_pool_too_small_preempts_and_every_request_equals_its_solo_run(model):
    requests = {}
    for i in range(6):
        params = SamplingParams(max_tokens=40, temperature=0.8 if i % 2 else 0, seed=i, ignore_eos=True, logprobs=1)
        requests[f"u{i}"] = (tokens(20 + 7 * i, seed=10 + i), params)
    # 12 blocks: every prompt fits alone, the six of them with 40 new tokens each do not.
    engine = make_engine(model, max_users=6, max_seq_len=128, prefill_chunk=CHUNK, kv_cache_memory=gib_for(model, 12))
    for rid, (p, params) in requests.items():
        engine.add_request(rid, p, params)
    crowd = run_to_completion(engine)
    assert engine.stats()["preemptions"] > 0
    for rid, (p, params) in requests.items():
        alone = solo(model, p, params)
        assert crowd[rid]["token_ids"] == alone["token_ids"], rid
        assert crowd[rid]["logprobs"] == alone["logprobs"], rid
        assert crowd[rid]["usage"] == (len(p), 40)


def test_the_same_memory_runs_128_short_requests_at_once(model):
    # 32 users x 64 positions of a slot cache = 128 blocks of 16: enough for 128 short requests.
    engine = make_engine(model, max_users=128, max_seq_len=64, prefill_chunk=CHUNK,
                         kv_cache_memory=gib_for(model, 128), max_queued=256)
    assert engine.stats()["kv_tokens"] == 32 * 64
    prompts = {f"s{i}": tokens(6 + i % 5, seed=100 + i) for i in range(128)}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    most_running, results = 0, {}
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
        most_running = max(most_running, engine.stats()["num_running"])
    assert most_running == 128 and engine.stats()["preemptions"] == 0
    assert all(len(t) == 6 for t in results.values()) and len(results) == 128
    for rid in ("s0", "s77", "s127"):
        assert results[rid] == solo(model, prompts[rid], params)["token_ids"]


def test_a_prompt_larger_than_the_pool_is_refused_naming_the_limit(model):
    engine = make_engine(model, max_seq_len=256, kv_cache_memory=gib_for(model, 4))
    assert engine.stats()["max_seq_len"] == 64  # one sequence must fit the pool alone
    with pytest.raises(InvalidRequest, match="context limit is 64 tokens.*the KV cache holds 64 tokens"):
        engine.add_request("big", tokens(64, seed=0), GREEDY)
    engine.add_request("fits", tokens(63, seed=0), SamplingParams(max_tokens=5, temperature=0))
    out = run_to_completion(engine)["fits"]
    assert out["finish_reason"].value == "length" and out["usage"] == (63, 1)


def test_a_budget_too_small_for_one_block_is_an_error(model):
    with pytest.raises(ValueError, match="holds no block"):
        make_engine(model, kv_cache_memory=1e-9)
    with pytest.raises(ValueError, match="positive number of GiB"):
        make_engine(model, kv_cache_memory=0)
