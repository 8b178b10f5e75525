"""Scheduler with a block pool: admission by free blocks, preemption of the newest sequence,
replay after it, prefix reuse by whole chunks. Plain Python, no model."""

import pytest

from llamaserve.engine.request import FinishReason, InvalidRequest, SamplingParams
from llamaserve.engine.scheduler import Scheduler, Sequence, SequenceStatus


def seq(rid, n_prompt=4, first=1, **params):
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(**params))


def step(sched, token=7):
    """Pretend the engine ran the plan: chunks advance; a last chunk of a new request and every
    non-replaying decode add a token."""
    plan = sched.schedule()
    for c in plan.prefills:
        c.seq.num_prefilled = c.end
        if c.is_last and not c.seq.output_token_ids:
            c.seq.output_token_ids.append(token)
    for s in plan.decodes:
        if not s.replaying:
            s.output_token_ids.append(token)
    return plan


def test_admission_waits_for_blocks_for_the_whole_prompt_in_arrival_order():
    sched = Scheduler(max_users=4, max_seq_len=64, prefill_chunk=64, num_blocks=4, block_size=16)
    a, b, c = seq("a", n_prompt=40), seq("b", n_prompt=20), seq("c", n_prompt=5)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    # a takes 3 blocks; b needs 2 of the 1 left and waits; c may not overtake it.
    assert [p.seq for p in plan.prefills] == [a] and len(a.block_ids) == 3
    assert b.status is c.status is SequenceStatus.WAITING
    sched.finish(a, FinishReason.STOP)
    assert sched.blocks.num_free == 4
    assert {p.seq.request_id for p in sched.schedule().prefills} == {"b", "c"}


def test_decode_growth_preempts_the_newest_which_comes_back_first_and_replays():
    sched = Scheduler(max_users=3, max_seq_len=64, prefill_chunk=64, num_blocks=4, block_size=16, prefix_cache=False)
    old, new = seq("old", n_prompt=16), seq("new", n_prompt=10)
    sched.add(old)
    sched.add(new)
    step(sched)  # both prefilled, one token each: old needs a second block for position 16
    assert len(old.block_ids) == 1 and len(new.block_ids) == 1
    late = seq("late", n_prompt=10)
    sched.add(late)  # takes the last free block once old has its second
    plan = step(sched)
    assert plan.decodes == [old, new] and len(old.block_ids) == 2 and plan.preempted == []
    assert sched.blocks.num_free == 0 and late.status is SequenceStatus.RUNNING
    for _ in range(20):
        plan = step(sched)
        if plan.preempted:
            break
    # new and late reach position 16 in the same step: new, the older, keeps going.
    assert plan.preempted == [late] and new in plan.decodes and len(new.block_ids) == 2
    assert late.status is SequenceStatus.WAITING and late.block_ids == [] and sched.waiting[0] is late
    assert sched.counters["preemptions"] == 1
    kept = list(late.output_token_ids)
    assert len(kept) == 6
    sched.finish(old, FinishReason.STOP)
    plan = sched.schedule()  # late comes back: its prompt again, from the start
    assert [(p.seq, p.start, p.end) for p in plan.prefills] == [(late, 0, 10)]
    late.num_prefilled = 10
    for expected in range(10, 10 + len(kept) - 1):
        plan = sched.schedule()
        row = [s for s in plan.decodes if s is late][0]
        assert row.replaying and row.decode_position == expected
        assert late.token_at(expected) == kept[expected - 10]
    plan = sched.schedule()
    assert not [s for s in plan.decodes if s is late][0].replaying
    assert late.output_token_ids == kept  # nothing lost
    assert sched.counters["preemptions"] == 1


def test_a_sequence_that_is_itself_the_newest_is_preempted_instead_of_anyone_else():
    sched = Scheduler(max_users=2, max_seq_len=32, prefill_chunk=32, num_blocks=2, block_size=16, prefix_cache=False)
    a, b = seq("a", n_prompt=14), seq("b", n_prompt=15)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)  # a at 16 tokens: position 15 still in its block; b at 17 needs a new one
    plan = step(sched)
    assert plan.preempted == [b] and a.status is SequenceStatus.RUNNING


def test_prefix_reuse_takes_whole_chunks_and_never_the_last_prompt_token():
    sched = Scheduler(max_users=4, max_seq_len=256, prefill_chunk=32, num_blocks=32, block_size=16)
    first = seq("first", n_prompt=100)
    sched.add(first)
    for _ in range(4):
        step(sched)
    sched.schedule()  # registers what was prefilled
    # Registered: the 3 whole chunks (96 tokens = 6 blocks); not the 4-token last chunk.
    assert first.num_registered == 6 and sched.blocks.num_cached == 6
    same_start = seq("same", n_prompt=80)  # the first 80 tokens of `first`
    exact = seq("exact", n_prompt=96)  # may reuse only 64: its last token must be computed
    other = seq("other", n_prompt=80, first=2)
    for s in (same_start, exact, other):
        sched.add(s)
    sched.schedule()
    starts = {s.request_id: s.num_prefilled for s in (same_start, exact, other)}
    assert starts == {"same": 64, "exact": 64, "other": 0}
    assert same_start.block_ids[:4] == first.block_ids[:4]
    assert all(sched.blocks.ref_count(b) == 3 for b in first.block_ids[:4])
    assert sched.counters["prefix_cache_hits"] == 128 and sched.counters["prefix_cache_queries"] == 100 + 80 + 96 + 80


def test_finished_prefixes_stay_cached_until_their_blocks_are_needed():
    sched = Scheduler(max_users=2, max_seq_len=128, prefill_chunk=16, num_blocks=4, block_size=16)
    a = seq("a", n_prompt=40)
    sched.add(a)
    for _ in range(3):
        step(sched)
    sched.finish(a, FinishReason.STOP)
    assert sched.blocks.num_free == 4 and sched.blocks.num_cached == 2
    again = seq("again", n_prompt=40)
    sched.add(again)
    assert sched.schedule().prefills[0].start == 32
    sched.finish(again, FinishReason.STOP)
    hog = seq("hog", n_prompt=60, first=500)  # needs all 4 blocks: the cached ones are evicted
    sched.add(hog)
    assert sched.schedule().prefills[0].seq is hog and sched.blocks.num_cached == 0


def test_prompt_logprobs_and_disabled_cache_reuse_nothing():
    sched = Scheduler(max_users=4, max_seq_len=256, prefill_chunk=16, num_blocks=32, block_size=16)
    a = seq("a", n_prompt=40)
    sched.add(a)
    for _ in range(3):
        step(sched)
    scoring = seq("scoring", n_prompt=40, prompt_logprobs=1)
    sched.add(scoring)
    assert sched.schedule().prefills[0].start == 0
    off = Scheduler(max_users=4, max_seq_len=256, prefill_chunk=16, num_blocks=32, block_size=16, prefix_cache=False)
    b = seq("b", n_prompt=40)
    off.add(b)
    for _ in range(3):
        step(off)
    off.add(seq("c", n_prompt=40))
    assert off.schedule().prefills[0].start == 0 and off.blocks.num_cached == 0


def test_the_context_limit_is_what_the_pool_holds():
    sched = Scheduler(max_users=2, max_seq_len=4096, num_blocks=4, block_size=16)
    assert sched.max_seq_len == 64
    with pytest.raises(InvalidRequest, match="the KV cache holds 64 tokens"):
        sched.add(seq("big", n_prompt=64))
    sched.add(seq("ok", n_prompt=63))


def test_abort_gives_blocks_back():
    sched = Scheduler(max_users=2, max_seq_len=64, prefill_chunk=64, num_blocks=4, block_size=16)
    a = seq("a", n_prompt=50)
    sched.add(a)
    sched.schedule()
    assert sched.blocks.num_free == 0
    sched.abort("a")
    assert sched.blocks.num_free == 4 and a.block_ids == []
