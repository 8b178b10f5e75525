"""The engine process's loop (server/engine_process.py) driven in-process through real
multiprocessing queues, with a scripted engine."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time

from llamaserve.engine.engine import QueueFull
from llamaserve.engine.request import FinishReason, InvalidRequest, RequestOutput, SamplingParams
from llamaserve.server.engine_process import run_loop
from llamaserve.server.engine_protocol import Abort, AddRequest, Rejected, RejectKind, Shutdown, StepOutputs


class ScriptedEngine:
    """Accepts two requests (the third is QueueFull, a bad one InvalidRequest); each step
    finishes everything that was added."""

    def __init__(self):
        self.added, self.aborted = [], []
        self.pending: list[str] = []

    def add_request(self, rid, ids, params):
        if ids == [0]:
            raise InvalidRequest("prompt is bad", "prompt")
        if len(self.added) >= 2:
            raise QueueFull("full")
        self.added.append(rid)
        self.pending.append(rid)

    def abort(self, rid):
        self.aborted.append(rid)
        return False

    def has_unfinished(self):
        return bool(self.pending)

    def step(self):
        outs = [RequestOutput(r, [5], "x", finished=True, finish_reason=FinishReason.STOP) for r in self.pending]
        self.pending = []
        return outs

    def stats(self):
        return {"num_running": len(self.pending), "num_waiting": 0}

    scheduler = None


def drain(q, timeout=5.0):
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            if out:
                break
    return out


def test_loop_adds_rejects_steps_and_stops():
    ctx = mp.get_context("spawn")
    in_q, out_q = ctx.Queue(), ctx.Queue()
    engine = ScriptedEngine()
    t = threading.Thread(target=run_loop, args=(engine, in_q, out_q, os.getppid()), daemon=True)
    t.start()
    for rid, ids in (("a", [1]), ("b", [2]), ("c", [3]), ("bad", [0])):
        in_q.put(AddRequest(rid, ids, SamplingParams()))
    in_q.put(Abort("zzz"))
    msgs = drain(out_q)
    rejects = {m.request_id: (m.kind, m.param) for m in msgs if isinstance(m, Rejected)}
    assert rejects == {"c": (RejectKind.OVERLOADED, None), "bad": (RejectKind.INVALID, "prompt")}
    finished = [o.request_id for m in msgs if isinstance(m, StepOutputs) for o in m.outputs]
    assert sorted(finished) == ["a", "b"] and engine.aborted == ["zzz"]
    in_q.put(Shutdown())
    t.join(5)
    assert not t.is_alive()


def test_loop_exits_when_the_server_process_is_gone():
    ctx = mp.get_context("spawn")
    in_q, out_q = ctx.Queue(), ctx.Queue()
    # A parent pid that is not ours stands for "the server was killed and we were re-parented".
    t = threading.Thread(target=run_loop, args=(ScriptedEngine(), in_q, out_q, -1), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
