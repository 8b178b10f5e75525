"""Prefill whose numbers do not depend on where a prompt is cut into chunks, and the prefix cache
that this lets reuse at any block boundary (not only at whole prefill chunks).

On the CPU kernels every prompt token is a row of its own through the decode kernels (which read
keys and values in place through the block table) and every matmul of a bf16/int8/int4 model is
row-independent (kernels/qmatmul.cpp), so a row's keys, values and logits are the same bits
whatever chunk it came in. Elsewhere (fp32 on oneDNN, the torch path) reuse stays at whole chunks."""

import functools

import pytest
import torch
import engine_util
from engine_util import make_engine, one_thread, run_to_completion, tiny_model
from engine_util import random_tokens as tokens

from llamaserve.engine.request import SamplingParams
from llamaserve.engine.runner import ModelRunner
from llamaserve.kernels import decode_attention, qmatmul
from llamaserve.weights.quant import quantize_model

pytestmark = pytest.mark.skipif(not (decode_attention.available() and qmatmul.available()),
                                reason="no C++ compiler for the CPU kernels")
_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
CHUNK = 32
# Requests one after the other on one engine (engine_util.run_in_turn), with this module's chunk.
run_in_turn = functools.partial(engine_util.run_in_turn, prefill_chunk=CHUNK)


def precision_model(precision: str):
    model = tiny_model()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    return quantize_model(model, precision)


@pytest.fixture(scope="module", params=["bf16", "int8", "int4"])
def model(request):
    return precision_model(request.param)


def test_a_prompt_cut_anywhere_has_the_same_keys_values_and_logits(model):
    prompt = tokens(150, seed=0)
    runner = ModelRunner(model, 5, 256)
    assert model.prefill_chunk_invariant
    per_slot = runner.cache.tables.max_blocks

    def prefill(slot, cuts):
        for a, b in zip(cuts, cuts[1:]):
            logits = runner.prefill(slot, prompt[a:b], a)
        return logits

    def blocks(slot):  # the slot's blocks, in position order (runner-owned tables: consecutive)
        first = 1 + slot * per_slot
        return [pool[first : first + 150 // 16] for pool in runner.cache.keys + runner.cache.values]

    reference = prefill(0, [0, 64, 128, 150])
    for slot, cuts in enumerate([[0, 48, 112, 150], [0, 1, 2, 50, 149, 150], [0, 150]], start=1):
        assert torch.equal(prefill(slot, cuts), reference), cuts
        assert all(torch.equal(a, b) for a, b in zip(blocks(slot), blocks(0))), cuts


def test_fp32_and_the_torch_path_reuse_only_whole_chunks():
    fp32 = tiny_model()
    assert not make_engine(fp32, prefill_chunk=CHUNK).scheduler.reuse_unit == 16
    on_torch = precision_model("bf16")
    on_torch.decode_kernels_fit = lambda: False  # LLAMASERVE_KERNELS=0, or a head size the kernels refuse
    engine = make_engine(on_torch, prefill_chunk=CHUNK)
    assert not on_torch.prefill_chunk_invariant and engine.scheduler.reuse_unit == CHUNK
    assert make_engine(precision_model("int8"), prefill_chunk=CHUNK).scheduler.reuse_unit == 16


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=1)
SYSTEM = tokens(90, seed=1)  # 5 full blocks and a part: whole chunks of 32 would reuse only 64


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_shared_prefix_is_reused_to_its_last_full_block_with_the_same_bits(model, params):
    prompts = [SYSTEM + tokens(10, seed=2), SYSTEM + tokens(12, seed=3)]
    cached, engine = run_in_turn(model, prompts, params)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 80  # 5 blocks; the 6th holds the two prompts' own tokens
    assert stats["prefill_tokens"] == 100 + (102 - 80)
    plain, _ = run_in_turn(model, prompts, params, prefix_cache=False)
    for rid in plain:
        assert cached[rid]["token_ids"] == plain[rid]["token_ids"]
        assert cached[rid]["logprobs"] == plain[rid]["logprobs"]  # the numbers, bit for bit


def test_users_arriving_together_take_the_system_prompt_by_the_block(model):
    prompts = {f"u{i}": SYSTEM + tokens(5 + i, seed=20 + i) for i in range(4)}
    results = {}
    for cache in (True, False):
        engine = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK, prefix_cache=cache)
        for rid, p in prompts.items():
            engine.add_request(rid, p, SEEDED)
        results[cache] = run_to_completion(engine)
        assert engine.stats()["prefix_cache_hits"] == (3 * 80 if cache else 0)
    for rid in prompts:
        assert results[True][rid]["logprobs"] == results[False][rid]["logprobs"]


def test_the_next_chat_turn_reuses_every_full_block_of_the_last(model):
    turn1 = SYSTEM + tokens(30, seed=4)  # 120 tokens: 7 full blocks
    engine = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK)
    plain = make_engine(model, max_seq_len=256, prefill_chunk=CHUNK, prefix_cache=False)
    for e in (engine, plain):
        e.add_request("t1", turn1, GREEDY)
    first = run_to_completion(engine)["t1"]
    assert run_to_completion(plain)["t1"]["token_ids"] == first["token_ids"]
    turn2 = turn1 + first["token_ids"] + tokens(20, seed=5)
    for e in (engine, plain):
        e.add_request("t2", turn2, GREEDY)
    second = run_to_completion(engine)["t2"]
    assert engine.stats()["prefix_cache_hits"] == 112  # whole chunks would have given 96
    assert second["logprobs"] == run_to_completion(plain)["t2"]["logprobs"]
