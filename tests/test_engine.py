"""Engine: continuous batching, reproducibility across batches, stops, aborts, limits."""

import random
import zlib

import pytest
import torch
from engine_util import EOS, ByteTokenizer, ScriptedModel, make_engine, one_thread, piece, run_to_completion, tiny_model

from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, SamplingParams
from llamaserve.engine.runner import ModelRunner


_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(0, 256) for _ in range(n)]


# ---- continuous batching and reproducibility ---------------------------------------------------
CFG = dict(max_users=32, max_seq_len=256, prefill_chunk=32)

# Probes: each is run alone, then in a crowd; prompt lengths cross the attention key buckets
# and the 32-token prefill chunk.
PROBES = {
    "greedy-short": (5, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)),
    "greedy-long": (140, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)),
    "topk": (9, SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=1, ignore_eos=True)),
    "topp": (60, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=2, logprobs=2, ignore_eos=True)),
    "minp-pen": (17, SamplingParams(max_tokens=24, temperature=0.7, min_p=0.05, repetition_penalty=1.2, seed=3, ignore_eos=True)),
    "crosses-128": (120, SamplingParams(max_tokens=20, temperature=1.0, seed=4, ignore_eos=True)),
}


def run_alone(model, rid):
    n, params = PROBES[rid]
    engine = make_engine(model, **CFG)
    engine.add_request(rid, prompt(n, seed=zlib.crc32(rid.encode())), params)
    return run_to_completion(engine)[rid]


def test_requests_give_identical_tokens_alone_and_in_a_changing_crowd(model):
    alone = {rid: run_alone(model, rid) for rid in PROBES}

    engine = make_engine(model, **CFG)
    rng = random.Random(42)
    bg_count = 0

    def add_background(k):
        nonlocal bg_count
        for _ in range(k):
            params = SamplingParams(
                max_tokens=rng.randrange(2, 30),
                temperature=rng.choice([0, 0.8, 1.0]),
                top_k=rng.choice([0, 5, 50]),
                seed=rng.randrange(1000),
                ignore_eos=True,
            )
            engine.add_request(f"bg{bg_count}", prompt(rng.randrange(1, 150), seed=1000 + bg_count), params)
            bg_count += 1

    arrivals = {0: ["greedy-long"], 3: ["topk", "greedy-short"], 7: ["topp"], 12: ["minp-pen", "crosses-128"]}
    results: dict[str, dict] = {}
    slot_users: dict[int, set] = {}
    max_running = 0
    add_background(28)
    for step in range(400):
        for rid in arrivals.get(step, []):
            n, params = PROBES[rid]
            engine.add_request(rid, prompt(n, seed=zlib.crc32(rid.encode())), params)
        if step in (2, 5, 9, 14):
            add_background(6)  # more users than slots: they queue and take freed slots
        if step == 6:
            assert engine.abort("bg3") and engine.abort("bg30")  # running and waiting
        for out in engine.step():
            r = results.setdefault(out.request_id, {"token_ids": [], "logprobs": [], "steps": []})
            r["token_ids"] += out.new_token_ids
            r["steps"].append(step)
            r["logprobs"] += out.logprobs or []
            if out.finished:
                r["finish_reason"] = out.finish_reason
        for seq in engine.scheduler.running.values():
            slot_users.setdefault(seq.slot, set()).add(seq.request_id)
        max_running = max(max_running, engine.stats()["num_running"])
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished()

    # The crowd really was a crowd: all slots busy, slots reused, users finishing at many steps.
    assert max_running == 32
    assert any(len(users) > 1 for users in slot_users.values())
    assert len({r["steps"][-1] for r in results.values()}) > 10
    assert results["bg3"]["finish_reason"] is FinishReason.ABORT
    assert results["bg30"]["finish_reason"] is FinishReason.ABORT and results["bg30"]["token_ids"] == []

    for rid, ref in alone.items():
        got = results[rid]
        assert got["token_ids"] == ref["token_ids"], rid
        assert got["finish_reason"] is FinishReason.LENGTH
        # Bit-identical logits: logprobs equal exactly, not approximately.
        assert [(lp.token_id, lp.logprob, lp.top) for lp in got["logprobs"]] == [
            (lp.token_id, lp.logprob, lp.top) for lp in ref["logprobs"]
        ], rid


def test_background_users_also_match_their_solo_runs(model):
    """Every user of a batch of varied users equals its own solo run, not only the probes."""
    rng = random.Random(7)
    reqs = {}
    for i in range(10):
        params = SamplingParams(
            max_tokens=rng.randrange(3, 12), temperature=rng.choice([0, 1.0]), top_k=rng.choice([0, 10]),
            seed=i, ignore_eos=True,
        )
        reqs[f"u{i}"] = (prompt(rng.randrange(1, 70), seed=i), params)
    engine = make_engine(model, **CFG)
    for rid, (p, params) in reqs.items():
        engine.add_request(rid, p, params)
    together = run_to_completion(engine)
    for rid, (p, params) in reqs.items():
        solo = make_engine(model, **CFG)
        solo.add_request(rid, p, params)
        assert run_to_completion(solo)[rid]["token_ids"] == together[rid]["token_ids"], rid


def test_chunked_prefill_gives_the_same_logits_as_one_shot(model):
    ids = prompt(150, seed=3)
    one = ModelRunner(model, max_users=2, max_seq_len=256)
    full = one.prefill(0, ids, 0)
    chunked = ModelRunner(model, max_users=2, max_seq_len=256)
    for start in range(0, len(ids), 32):
        last = chunked.prefill(1, ids[start : start + 32], start)
    torch.testing.assert_close(last, full, rtol=0, atol=1e-5)
    # ... and the caches agree, so decoding continues the same way.
    nxt = int(full.argmax())
    torch.testing.assert_close(
        chunked.decode([1], [nxt], [len(ids)]), one.decode([0], [nxt], [len(ids)]), rtol=0, atol=1e-5
    )


def test_chunk_size_does_not_change_greedy_output(model):
    ids = prompt(100, seed=4)
    outs = []
    for chunk in (16, 512):
        engine = make_engine(model, max_seq_len=256, prefill_chunk=chunk)
        engine.add_request("r", ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        outs.append(run_to_completion(engine)["r"]["token_ids"])
    assert outs[0] == outs[1]


# ---- stops -------------------------------------------------------------------------------------
def scripted_run(script, prompt_len=4, **params):
    engine = Engine(ScriptedModel(script, prompt_len), ByteTokenizer(), EngineConfig(max_users=4, max_seq_len=64))
    params.setdefault("max_tokens", 50)
    engine.add_request("r", list(range(10, 10 + prompt_len)), SamplingParams(temperature=0, **params))
    deltas, ids, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.text_delta)
            ids += out.new_token_ids
            final = out if out.finished else final
    return deltas, ids, final


def test_stop_token_ends_the_request_and_its_text_is_not_sent():
    script = [ord("h"), ord("i"), EOS, ord("x")]
    deltas, ids, final = scripted_run(script)
    assert ids == [ord("h"), ord("i"), EOS]
    assert "".join(deltas) == "hi"
    assert final.finish_reason is FinishReason.STOP
    assert (final.prompt_tokens, final.completion_tokens) == (4, 3)


def test_ignore_eos_and_extra_stop_token_ids():
    script = [ord("h"), EOS, ord("i"), ord("j"), ord("k")]
    _, ids, final = scripted_run(script, ignore_eos=True, max_tokens=4)
    assert ids == script[:4] and final.finish_reason is FinishReason.LENGTH
    _, ids, final = scripted_run(script, ignore_eos=True, stop_token_ids=[ord("j")])
    assert ids == script[:4] and final.finish_reason is FinishReason.STOP


def test_stop_string_split_across_two_tokens_is_never_sent():
    tok = ByteTokenizer()
    # "x" "ya" "bz"... -> the stop string "ab" starts at the end of one token and ends in the next.
    ya, bc = piece("ya", tok), piece("bc", tok)
    script = [ord("x"), ya, bc, ord("q")]
    deltas, ids, final = scripted_run(script, stop=["ab", "never"])
    assert final.finish_reason is FinishReason.STOP
    assert ids == script[:3]
    assert deltas == ["x", "y", ""]  # the "a" of "ya" was held back, then dropped with the stop


def test_multibyte_characters_split_across_tokens_arrive_whole():
    text = "aé€b"
    script = list(text.encode("utf-8"))  # é is 2 tokens, € is 3
    deltas, ids, final = scripted_run(script, max_tokens=len(script))
    assert deltas == ["a", "", "é", "", "", "€", "b"]
    assert final.finish_reason is FinishReason.LENGTH
    # A stop string made of a multi-byte character matches on text, not on bytes.
    deltas, _, final = scripted_run(script, stop=["€"])
    assert "".join(deltas) == "aé" and final.finish_reason is FinishReason.STOP


def test_max_tokens_is_exact(model):
    engine = make_engine(model)
    for n in (1, 2, 7):
        engine.add_request(f"m{n}", prompt(5), SamplingParams(max_tokens=n, temperature=1.0, seed=n, ignore_eos=True))
    res = run_to_completion(engine)
    for n in (1, 2, 7):
        assert len(res[f"m{n}"]["token_ids"]) == n
        assert res[f"m{n}"]["finish_reason"] is FinishReason.LENGTH
        assert res[f"m{n}"]["usage"] == (5, n)


def test_context_limit_stops_with_length(model):
    engine = make_engine(model, max_seq_len=32)
    engine.add_request("c", prompt(28), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    res = run_to_completion(engine)["c"]
    assert len(res["token_ids"]) == 4 and res["finish_reason"] is FinishReason.LENGTH


def test_invalid_prompts_are_rejected_before_taking_a_slot(model):
    engine = make_engine(model, max_seq_len=32, max_users=2)
    for bad in ([], prompt(32), [0, 512], [-1]):
        with pytest.raises(InvalidRequest) as err:
            engine.add_request("x", bad, SamplingParams())
        assert err.value.param == "prompt"
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("x", [1], SamplingParams(top_p=0))
    assert err.value.param == "top_p"
    assert engine.stats()["num_waiting"] == 0 and not engine.has_unfinished()
    engine.add_request("fits", prompt(31), SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(run_to_completion(engine)["fits"]["token_ids"]) == 1


def test_queue_full(model):
    engine = make_engine(model, max_users=1, max_queued=2)
    for rid in "abc":  # one for the free slot, two waiting
        engine.add_request(rid, [1], SamplingParams())
    with pytest.raises(QueueFull):
        engine.add_request("d", [1], SamplingParams())
    assert engine.stats()["num_waiting"] == 3


def test_abort_waiting_and_running_frees_the_slot(model):
    engine = make_engine(model, max_users=2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, prompt(6, seed=ord(rid)), params)
    engine.step()
    engine.step()
    assert engine.stats()["num_running"] == 2 and engine.stats()["num_waiting"] == 1
    assert engine.abort("c")  # waiting
    assert engine.abort("a")  # running
    assert not engine.abort("a") and not engine.abort("unknown")
    assert engine.stats()["num_running"] == 1 and engine.stats()["num_free_slots"] == 1
    engine.add_request("d", prompt(6, seed=9), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = engine.step()
    finals = {o.request_id: o for o in outs if o.finished}
    assert finals["a"].finish_reason is FinishReason.ABORT and finals["c"].finish_reason is FinishReason.ABORT
    assert finals["a"].completion_tokens == 2 and finals["c"].completion_tokens == 0
    assert any(o.request_id == "d" for o in outs)  # took a's slot in the same step
    rest = run_to_completion(engine)
    assert "a" not in rest and "c" not in rest
    solo = make_engine(model, max_users=2)
    solo.add_request("d", prompt(6, seed=9), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    d_tokens = [o.new_token_ids for o in outs if o.request_id == "d"][0] + rest["d"]["token_ids"]
    assert d_tokens == run_to_completion(solo)["d"]["token_ids"]


def test_idle_engine_step_is_empty(model):
    engine = make_engine(model)
    assert engine.step() == [] and not engine.has_unfinished()
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=1))
    engine.abort("a")
    assert engine.has_unfinished()  # the abort still has to be reported
    [out] = engine.step()
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.step() == [] and not engine.has_unfinished()


def test_engine_runs_the_mock_model():
    from llamaserve.model.mock import MockTransformer

    from engine_util import tiny_args

    mock = MockTransformer(tiny_args(), eot_id=EOS)
    engine = Engine(mock, ByteTokenizer(), EngineConfig(max_users=4, max_seq_len=128))
    for i in range(6):
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=50, temperature=0))
    res = run_to_completion(engine)
    for r in res.values():
        assert r["finish_reason"] is FinishReason.STOP and r["token_ids"][-1] == EOS
        assert len(r["token_ids"]) == 10  # every 10th generated token is end of turn, like the original mock


def test_a_failing_model_call_ends_that_steps_requests_with_an_error(model):
    engine = make_engine(model, max_users=4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    engine.add_request("early", prompt(4), params)
    engine.step()  # "early" is decoding from now on
    real_prefill = engine.runner.prefill

    def broken_prefill(*args):
        raise RuntimeError("device lost")

    engine.runner.prefill = broken_prefill
    engine.add_request("late", prompt(4, seed=1), params)
    outs = {o.request_id: o for o in engine.step()}
    for rid in ("early", "late"):  # both were part of the failed step
        assert outs[rid].finished and outs[rid].finish_reason is FinishReason.ERROR
        assert "device lost" in outs[rid].error
    assert engine.stats()["num_free_slots"] == 4 and engine.stats()["errors"] == 2
    engine.runner.prefill = real_prefill  # the engine keeps serving
    engine.add_request("after", prompt(4), params)
    assert len(run_to_completion(engine)["after"]["token_ids"]) == 5
