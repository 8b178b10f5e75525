"""A seeded or greedy request gives the same bits alone and in a crowd, on a model wide enough
(dim 768) that a row's bits change with the row count unless the engine holds them fixed; and
each mechanism that holds them, switched off, makes the outputs differ (negative controls), so
these tests cannot silently lose their teeth. (The dim-64 model of test_engine.py keeps its bits
with the padding switched off: its matmuls are too narrow to take another kernel.)"""

import random
import zlib

import pytest
import torch
from engine_util import make_engine

from llamaserve.config import ModelArgs
from llamaserve.engine.request import SamplingParams
from llamaserve.engine.runner import ModelRunner
from llamaserve.model.llama import Attention, Transformer
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.quant import quantize_model

WIDE = ModelArgs(dim=768, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=512, multiple_of=256)
CFG = dict(max_users=12, max_seq_len=256, prefill_chunk=64)
PROBES = {  # prompt length, params; lengths cross the prefill chunk and the 16-key buckets
    "greedy": (40, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)),
    "seeded": (75, SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True, logprobs=2)),
    "greedy-long": (130, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)),
}
ARRIVALS = {0: ["greedy-long"], 2: ["greedy"], 5: ["seeded"]}


def prompt(rid: str, n: int) -> list[int]:
    # crc32, not hash(): Python salts string hashes per process, and a failure must reproduce.
    rng = random.Random(zlib.crc32(rid.encode()))
    return [rng.randrange(0, 256) for _ in range(n)]


def wide_model(kernels: bool = True, args: ModelArgs = WIDE) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=5, std=0.02), strict=False)
    if not kernels:
        model.decode_kernels_fit = lambda: False  # the torch decode path (LLAMASERVE_KERNELS=0, bf16)
    return model.eval()


def _collect(engine, arrivals, max_steps=400) -> dict[str, list]:
    """Step until idle; per request the (token, logprob, top) triples (bitwise: floats compare exactly)."""
    out: dict[str, list] = {}
    for step in range(max_steps):
        for rid in arrivals.get(step, []):
            n, params = PROBES[rid]
            engine.add_request(rid, prompt(rid, n), params)
        for o in engine.step():
            out.setdefault(o.request_id, [])
            out[o.request_id] += [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs or []] or o.new_token_ids
        if step > max(arrivals) and not engine.has_unfinished():
            return out
    raise AssertionError("engine did not finish")


def _record_rows(runner, method: str) -> list[int]:
    """Wraps runner.<method>(slots, ...) to record how many slots each call takes."""
    counts: list[int] = []
    original = getattr(runner, method)

    def recording(slots, *args):
        counts.append(len(slots))
        return original(slots, *args)

    setattr(runner, method, recording)
    return counts


def alone_and_crowd(model, **config) -> tuple[dict, dict, int]:
    """Each probe alone, then all of them among 14 background users (more than the slots, so
    users queue, finish at different steps and hand their slots on); and the largest decode call."""
    alone = {rid: _collect(make_engine(model, **CFG, **config), {0: [rid]})[rid] for rid in PROBES}
    engine = make_engine(model, **CFG, **config)
    rng = random.Random(17)
    for i in range(14):
        params = SamplingParams(max_tokens=rng.randrange(6, 24), temperature=rng.choice([0, 1.0]), seed=i, ignore_eos=True)
        engine.add_request(f"bg{i}", prompt(f"bg{i}", rng.randrange(1, 60)), params)
    rows = _record_rows(engine.runner, "decode")
    crowd = _collect(engine, ARRIVALS)
    return alone, {rid: crowd[rid] for rid in PROBES}, max(rows)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_alone_equals_crowd_on_the_decode_kernels():
    alone, crowd, most_rows = alone_and_crowd(wide_model())
    assert most_rows == CFG["max_users"]  # the crowd really filled every slot
    assert crowd == alone


def test_negative_control_without_decode_padding_the_crowd_changes_the_bits():
    """min_decode_rows=1: a user alone decodes in 1-row calls, which take another matmul kernel."""
    alone, crowd, _ = alone_and_crowd(wide_model(), min_decode_rows=1)
    assert crowd != alone


@pytest.mark.parametrize("n_threads", [2, 4])
def test_alone_equals_crowd_on_the_torch_decode_path(threads, n_threads):
    threads(n_threads)
    alone, crowd, _ = alone_and_crowd(wide_model(kernels=False))
    assert crowd == alone


def test_negative_control_batched_torch_attention_changes_the_bits(threads, monkeypatch):
    """Decode attention with all rows in one torch call (instead of the kernel's or the torch
    path's one row at a time): torch splits the keys by batch size and thread count."""
    threads(4)
    monkeypatch.setattr(Attention, "rows_alone", False)
    alone, crowd, _ = alone_and_crowd(wide_model(kernels=False))
    assert crowd != alone


def test_int8_alone_equals_crowd():
    alone, crowd, _ = alone_and_crowd(quantize_model(wide_model()))
    assert crowd == alone


def test_int8_decode_logits_stay_within_two_percent_of_fp32():
    """The README's int8 bound on the test models (tests/test_quant.py's, std 0.02: the dim-768 one
    gives 2.2%), through the runner's decode path (not only prefill): greedy decode of the fp32
    model, the int8 model fed the same tokens, logits compared every step."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64)
    ref, q = wide_model(args=args), quantize_model(wide_model(args=args))
    runners = [ModelRunner(m, max_users=4, max_seq_len=256) for m in (ref, q)]
    ids = prompt("int8", 50)
    logits = [r.prefill(1, ids, 0)[0] for r in runners]
    for pos in range(len(ids), len(ids) + 12):
        err = float((logits[1] - logits[0]).norm() / logits[0].norm())
        assert 0 < err < 0.02, (pos, err)
        token = int(logits[0].argmax())
        logits = [r.decode([1], [token], [pos])[0] for r in runners]


def test_alone_equals_crowd_with_prefill_chunks_of_several_users_in_one_call():
    """A prefill budget of several chunks puts equal-length chunks of different users into one
    model call (runner.prefill_many); each user still gets the bits it gets alone."""
    model = wide_model()
    alone = {rid: _collect(make_engine(model, **CFG), {0: [rid]})[rid] for rid in PROBES}
    engine = make_engine(model, **CFG, max_prefill_tokens=512)
    for i in range(5):  # as long as "seeded" and arriving with it: their chunks share calls
        engine.add_request(f"twin{i}", prompt(f"twin{i}", PROBES["seeded"][0]),
                           SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    widths = _record_rows(engine.runner, "prefill_many")
    crowd = _collect(engine, {0: ["seeded"], 3: ["greedy", "greedy-long"]})
    assert max(widths) >= 6  # the probe and its five twins in one call
    assert {rid: crowd[rid] for rid in PROBES} == alone
