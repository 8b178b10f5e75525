"""Scheduler and stop logic: plain Python, no model."""

import pytest

from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, SamplingParams
from llamaserve.engine.scheduler import Scheduler, Sequence, SequenceStatus
from llamaserve.engine.stops import StopChecker


def seq(rid, n_prompt=4, **params):
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(**params))


def run_step(sched, token=7):
    """Pretend the engine ran the plan: prefill chunks advance, every finished prefill and
    every decode gets one token."""
    plan = sched.schedule()
    for c in plan.prefills:
        c.seq.num_prefilled = c.end
        if c.is_last:
            c.seq.output_token_ids.append(token)
    for s in plan.decodes:
        s.output_token_ids.append(token)
    return plan


def test_slots_assigned_in_arrival_order_and_bounded():
    sched = Scheduler(max_users=2, max_seq_len=64, prefill_chunk=16)
    seqs = [seq(f"r{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.prefills] == ["r0", "r1"]
    assert {seqs[0].slot, seqs[1].slot} == {0, 1}
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].slot is None
    assert sched.num_waiting == 1 and sched.num_running == 2


def test_finished_user_frees_slot_for_the_next_step():
    sched = Scheduler(max_users=2, max_seq_len=64, prefill_chunk=16)
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    slot_a = a.slot
    sched.finish(a, FinishReason.STOP)
    assert a.is_finished and a.finish_reason is FinishReason.STOP
    plan = sched.schedule()
    assert c.slot == slot_a and c.status is SequenceStatus.RUNNING
    assert [p.seq for p in plan.prefills] == [c]
    assert plan.decodes == [b]


def test_decode_and_prefill_interleave_with_fixed_chunk_boundaries():
    sched = Scheduler(max_users=4, max_seq_len=256, prefill_chunk=8)
    short = seq("short", n_prompt=3)
    sched.add(short)
    run_step(sched)  # short is prefilled and has its first token
    long = seq("long", n_prompt=20)
    sched.add(long)
    chunks = []
    for _ in range(3):
        plan = run_step(sched)
        assert plan.decodes == [short]  # the running user decodes every step
        chunks += [(c.start, c.end) for c in plan.prefills]
    assert chunks == [(0, 8), (8, 16), (16, 20)]
    assert long.prefill_done and len(long.output_token_ids) == 1
    assert run_step(sched).decodes == [short, long]


def test_prefill_budget_packs_short_prompts_but_never_splits_differently():
    sched = Scheduler(max_users=8, max_seq_len=256, prefill_chunk=10)
    a, b, c = seq("a", n_prompt=4), seq("b", n_prompt=5), seq("c", n_prompt=4)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    # a (4) + b (5) fit the 10-token budget; c would exceed it and waits one step, whole.
    assert [(p.seq.request_id, p.start, p.end) for p in plan.prefills] == [("a", 0, 4), ("b", 0, 5)]
    for p in plan.prefills:
        p.seq.num_prefilled = p.end
    plan = sched.schedule()
    assert [(p.seq.request_id, p.start, p.end) for p in plan.prefills] == [("c", 0, 4)]


def test_queue_bound_raises_queue_full():
    sched = Scheduler(max_users=1, max_seq_len=64, prefill_chunk=16, max_queued=2)
    sched.add(seq("a"))  # will take the free slot at the next step: not counted as waiting
    sched.add(seq("b"))
    sched.add(seq("c"))
    with pytest.raises(QueueFull):
        sched.add(seq("d"))
    sched.schedule()  # a takes the slot; b and c wait
    with pytest.raises(QueueFull):
        sched.add(seq("d"))
    sched.abort("b")
    sched.add(seq("d"))


@pytest.mark.parametrize("n_prompt", [0, 64])
def test_prompt_that_cannot_fit_is_rejected_before_taking_a_slot(n_prompt):
    sched = Scheduler(max_users=1, max_seq_len=64, prefill_chunk=16)
    with pytest.raises(InvalidRequest) as err:
        sched.add(seq("x", n_prompt=n_prompt))
    assert err.value.param == "prompt"
    assert sched.num_waiting == 0 and sched.num_free_slots == 1
    sched.add(seq("ok", n_prompt=63))  # 63 + 1 generated token fits exactly


def test_duplicate_request_id_rejected():
    sched = Scheduler(max_users=1, max_seq_len=64)
    sched.add(seq("a"))
    with pytest.raises(InvalidRequest):
        sched.add(seq("a"))


def test_abort_waiting_and_running():
    sched = Scheduler(max_users=1, max_seq_len=64, prefill_chunk=16)
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert a.slot == 0
    assert sched.abort("b") is b  # waiting
    assert b.finish_reason is FinishReason.ABORT and sched.num_waiting == 1
    assert sched.abort("a") is a  # running: slot free at once
    assert sched.num_free_slots == 1
    plan = sched.schedule()
    assert [p.seq for p in plan.prefills] == [c] and c.slot == 0
    assert sched.abort("a") is None and sched.abort("nope") is None
    sched.abort("c")
    assert not sched.has_unfinished()


def test_cache_usage_counts_blocks_held():
    sched = Scheduler(max_users=2, max_seq_len=64, prefill_chunk=16, num_blocks=8, block_size=16)
    sched.add(seq("a", n_prompt=20))
    run_step(sched)
    assert sched.cache_usage() == pytest.approx(2 / 8)


# ---- stops ------------------------------------------------------------------------------------
class CharDetok:
    """Token id -> one piece of text from a table."""

    def __init__(self, table):
        self.table = table

    def push(self, token_id):
        return self.table[token_id]


def feed(checker, ids):
    texts, reason = [], None
    for t in ids:
        delta, reason = checker.append(t)
        texts.append(delta)
        if reason is not None:
            break
    return texts, reason


TABLE = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "!", 5: "EN", 6: "D", 9: "<eos>", 10: " x"}


def checker(max_seq_len=1000, prompt_len=3, **params):
    params.setdefault("max_tokens", 100)
    return StopChecker(CharDetok(TABLE), SamplingParams(**params), {9}, prompt_len, max_seq_len)


def test_stop_token_stops_without_its_text():
    texts, reason = feed(checker(), [0, 1, 9, 2])
    assert reason is FinishReason.STOP and "".join(texts) == "Hello"


def test_ignore_eos_keeps_going_but_extra_stop_ids_still_stop():
    texts, reason = feed(checker(ignore_eos=True, max_tokens=4), [0, 9, 1, 2])
    assert reason is FinishReason.LENGTH and "".join(texts) == "Hel<eos>lo wor"
    texts, reason = feed(checker(ignore_eos=True, stop_token_ids=[4]), [0, 9, 4, 1])
    assert reason is FinishReason.STOP and "".join(texts) == "Hel<eos>"


def test_stop_string_split_across_tokens_is_never_sent():
    c = checker(stop=["END"])
    texts, reason = feed(c, [0, 1, 10, 5, 6, 1])
    assert reason is FinishReason.STOP
    assert "".join(texts) == "Hello x"
    # "EN" was held back when it arrived: it could have been the start of "END".
    assert texts[3] == ""


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    texts, reason = feed(checker(stop=["ENDX"], max_tokens=4), [0, 5, 6, 1])
    assert reason is FinishReason.LENGTH and texts == ["Hel", "", "", "ENDlo"]


def test_earliest_of_several_stop_strings_wins():
    texts, reason = feed(checker(stop=["ld", "o w"]), [0, 1, 2, 3])
    assert reason is FinishReason.STOP and "".join(texts) == "Hell"


def test_max_tokens_is_exact():
    texts, reason = feed(checker(max_tokens=3), [0, 1, 2, 3, 4])
    assert reason is FinishReason.LENGTH and len(texts) == 3


def test_context_limit_stops_with_length():
    c = checker(max_seq_len=8, prompt_len=5, max_tokens=50)
    texts, reason = feed(c, [0, 1, 2, 3])
    assert reason is FinishReason.LENGTH and len(texts) == 3  # 5 prompt + 3 generated = 8


def test_max_prefill_tokens_runs_several_chunks_per_step_cut_as_with_one():
    """A budget of several chunks: one long prompt advances several chunks in a step, then the
    next prompt's chunks follow; every chunk boundary is where one-chunk steps put it."""
    def boundaries(budget):
        sched = Scheduler(max_users=4, max_seq_len=256, prefill_chunk=8, max_prefill_tokens=budget)
        a, b = seq("a", n_prompt=20), seq("b", n_prompt=12)
        sched.add(a)
        sched.add(b)
        steps = []
        while not (a.prefill_done and b.prefill_done):
            steps.append([(c.seq.request_id, c.start, c.end) for c in run_step(sched).prefills])
        return steps

    one = boundaries(None)
    assert one[0] == [("a", 0, 8)] and len(one) == 5  # the default budget: one chunk per step
    several = boundaries(28)
    assert several[0] == [("a", 0, 8), ("a", 8, 16), ("a", 16, 20), ("b", 0, 8)]
    assert sorted(c for s in several for c in s) == sorted(c for s in one for c in s)


def test_max_prefill_tokens_below_one_chunk_is_refused():
    with pytest.raises(ValueError, match=r"max_prefill_tokens \(4\) must be at least prefill_chunk \(8\)"):
        Scheduler(max_users=2, max_seq_len=64, prefill_chunk=8, max_prefill_tokens=4)
