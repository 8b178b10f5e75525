"""The typed protocol between the server and its engine process (server/engine_protocol.py), the
queue time that rides on a request's first output, and the one translation of engine-side
failures into each API's answer (server/errors.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import threading
import time

import pytest

from llamaserve.server.quotas import QuotaExceeded

from engine_util import make_engine
from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, RequestOutput, SamplingParams
from llamaserve.server import engine_protocol as proto
from llamaserve.server.engine_process import run_loop
from llamaserve.server.errors import (
    Api,
    EngineFailed,
    EngineOverloaded,
    EngineUnavailable,
    engine_error,
    openai_error_body,
    openai_stream_error,
)


def test_queue_time_is_on_the_first_output_only_and_counts_the_wait_for_a_slot():
    engine = make_engine(max_users=1)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("first", [1, 2, 3], params)
    engine.add_request("second", [4, 5, 6], params)
    outputs: dict[str, list[RequestOutput]] = {"first": [], "second": []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for rid, outs in outputs.items():
        assert outs[0].queue_time_s is not None and outs[0].queue_time_s >= 0, rid
        assert all(o.queue_time_s is None for o in outs[1:]), rid
    # "second" waited for the only slot while "first" ran three steps.
    assert outputs["second"][0].queue_time_s > outputs["first"][0].queue_time_s


def test_a_request_aborted_while_waiting_has_no_queue_time_and_leaves_nothing_behind():
    engine = make_engine(max_users=1)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request("a", [1, 2], params)
    engine.add_request("b", [3, 4], params)
    assert engine.abort("b")
    outs = [o for _ in range(10) for o in engine.step()]
    aborted = [o for o in outs if o.request_id == "b"]
    assert len(aborted) == 1 and aborted[0].finish_reason == FinishReason.ABORT and aborted[0].queue_time_s is None
    assert engine._arrived == {} and engine._queue_time == {}


class OpaqueEngine:
    """Only the engine's public interface; anything else (a scheduler, a runner) is an error,
    so the loop is shown not to read engine internals."""

    def __init__(self):
        self.pending: list[str] = []
        self.added = 0

    def add_request(self, rid, ids, params):
        if ids == [0]:
            raise InvalidRequest("prompt is bad", "prompt")
        if self.added >= 1:
            raise QueueFull("full")
        self.added += 1
        self.pending.append(rid)

    def abort(self, rid):
        return False

    def has_unfinished(self):
        return bool(self.pending)

    def step(self):
        outs = [RequestOutput(r, [5], "x", finished=True, finish_reason=FinishReason.STOP, queue_time_s=0.25)
                for r in self.pending]
        self.pending = []
        return outs

    def stats(self):
        return {"num_running": len(self.pending), "num_waiting": 0}

    def __getattr__(self, name):
        raise AssertionError(f"the engine process read engine.{name}")


def test_every_message_is_typed_and_crosses_a_real_process_queue():
    ctx = mp.get_context("spawn")
    in_q, out_q = ctx.Queue(), ctx.Queue()
    t = threading.Thread(target=run_loop, args=(OpaqueEngine(), in_q, out_q, os.getppid()), daemon=True)
    t.start()
    in_q.put(proto.AddRequest("a", [1], SamplingParams()))
    in_q.put(proto.AddRequest("b", [2], SamplingParams()))
    in_q.put(proto.AddRequest("bad", [0], SamplingParams()))
    msgs, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and not any(isinstance(m, proto.Idle) for m in msgs):
        try:
            msgs.append(out_q.get(timeout=0.1))
        except queue.Empty:
            pass
    in_q.put(proto.Shutdown())
    t.join(5)
    assert not t.is_alive()
    assert all(isinstance(m, (proto.StepOutputs, proto.Idle, proto.Rejected)) for m in msgs), msgs
    rejected = {m.request_id: m for m in msgs if isinstance(m, proto.Rejected)}
    assert rejected["b"].kind is proto.RejectKind.OVERLOADED and rejected["bad"].kind is proto.RejectKind.INVALID
    assert rejected["bad"].param == "prompt"
    steps = [m for m in msgs if isinstance(m, proto.StepOutputs)]
    assert [o.request_id for m in steps for o in m.outputs] == ["a"]
    assert steps[0].outputs[0].queue_time_s == 0.25 and steps[0].stats["num_waiting"] == 0


def test_messages_pickle_and_states_print_as_their_names():
    msg = proto.AddRequest("r", [1, 2], SamplingParams(max_tokens=3))
    assert pickle.loads(pickle.dumps(msg)) == msg
    assert str(proto.EngineState.READY) == "ready" and proto.EngineState.FAILED == "failed"
    assert f"engine {proto.EngineState.RESTARTING}" == "engine restarting"


@pytest.mark.parametrize("exc, original, openai", [
    # Issue 15: the original route's 503 says when to retry too.
    (EngineOverloaded("full"), (503, "Service overloaded, try again later.", {"Retry-After": "1"}),
     (429, "rate_limit_error", "rate_limit_exceeded", {"Retry-After": "1"})),
    (EngineUnavailable("the engine is loading; try again shortly"),
     (503, "the engine is loading; try again shortly", {"Retry-After": "1"}),
     (503, "server_error", "engine_unavailable", {"Retry-After": "1"})),
    (InvalidRequest("top_p must be in (0, 1]", "top_p"), (400, "top_p must be in (0, 1]", {}),
     (400, "invalid_request_error", None, {})),
    (EngineFailed("boom"), (500, "the engine failed: boom", {}), (500, "server_error", "engine_failed", {})),
    (QuotaExceeded("tokens_per_minute", "over", 12.5), (503, "over", {"Retry-After": "13"}),
     (429, "rate_limit_error", "quota_exceeded", {"Retry-After": "13"})),
    (QuotaExceeded("max_tokens", "too many", None), (400, "too many", {}), (400, "invalid_request_error", "quota_exceeded", {})),
])
def test_engine_errors_are_translated_once_for_both_apis(exc, original, openai):
    o = engine_error(exc, Api.ORIGINAL)
    assert (o.status, o.message, o.headers) == original
    a = engine_error(exc, Api.OPENAI)
    assert (a.status, a.type, a.code, a.headers) == openai
    body = openai_error_body(a)["error"]
    assert body["message"] == a.message and body["param"] == getattr(exc, "param", None)


def test_a_failed_stream_ends_with_an_openai_error_event():
    event = openai_stream_error(EngineFailed("lost"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert '"message": "the engine failed: lost"' in event and '"code": "engine_failed"' in event
