"""How a route sees one engine request (server/state.py Generation), against a scripted engine
handle: an engine-side failure of a request is an error, never a normal end of text."""

from __future__ import annotations

import asyncio

import pytest

from llamaserve.engine.request import FinishReason, RequestOutput, SamplingParams
from llamaserve.server.engine_client import EngineFailed, EngineOverloaded
from llamaserve.server.settings import ServerSettings
from llamaserve.server.state import Generation, ServerState


class ScriptedEngine:
    """generate() yields (or raises) the scripted items, one script per call."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.stats = {"num_running": 1}
        self.calls = 0

    async def generate(self, request_id, prompt_ids, params):
        self.calls += 1
        for item in self.scripts.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def out(text, finished=False, reason=None, error=None, n=1):
    return RequestOutput("r", [1], text, finished=finished, finish_reason=reason, prompt_tokens=3,
                         completion_tokens=n, error=error)


def run(engine, retry=None):
    state = ServerState(ServerSettings(no_auth=True), engine, None)
    gen = Generation(state, [1, 2, 3], SamplingParams())

    async def go():
        await gen.start(overload_retry_s=retry)
        return [o.text_delta async for o in gen]

    return asyncio.run(go()), gen


def test_normal_stream_and_usage():
    texts, gen = run(ScriptedEngine([out("a"), out("b", n=2), out("c", True, FinishReason.LENGTH, n=3)]))
    assert texts == ["a", "b", "c"] and gen.completion_tokens == 3 and gen.finish_reason == "length"


def test_engine_error_mid_stream_raises():
    with pytest.raises(EngineFailed, match="boom"):
        run(ScriptedEngine([out("a"), out("", True, FinishReason.ERROR, error="step failed: boom")]))
    with pytest.raises(EngineFailed, match="boom"):
        run(ScriptedEngine([out("", True, FinishReason.ERROR, error="boom")]))


def test_overload_is_retried_once_after_a_back_off():
    engine = ScriptedEngine([EngineOverloaded("full")], [out("ok", True, FinishReason.STOP)])
    texts, _ = run(engine, retry=0.01)
    assert texts == ["ok"] and engine.calls == 2
    with pytest.raises(EngineOverloaded):
        run(ScriptedEngine([EngineOverloaded("full")], [EngineOverloaded("full")]), retry=0.01)
    with pytest.raises(EngineOverloaded):
        run(ScriptedEngine([EngineOverloaded("full")]))  # OpenAI routes: no retry, 429 at once


def test_metrics_count_finished_and_aborted_but_not_refused():
    from prometheus_client import generate_latest

    engine = ScriptedEngine([out("x", True, FinishReason.STOP)], [EngineOverloaded("full")],
                            [out("a"), out("b", True, FinishReason.LENGTH, n=2)])
    state = ServerState(ServerSettings(no_auth=True), engine, None)

    async def go():
        g = Generation(state, [1, 2, 3], SamplingParams())
        await g.start()
        [o async for o in g]
        with pytest.raises(EngineOverloaded):
            await Generation(state, [1], SamplingParams()).start()
        g = Generation(state, [1, 2], SamplingParams())
        await g.start()
        await g.aclose()  # the client left after the first token

    asyncio.run(go())
    text = generate_latest(state.metrics.registry).decode()
    assert 'vllm:request_success_total{finished_reason="stop",model_name="llamaserve"} 1.0' in text
    assert 'vllm:request_success_total{finished_reason="abort",model_name="llamaserve"} 1.0' in text
    assert "vllm:e2e_request_latency_seconds_count{model_name=\"llamaserve\"} 2.0" in text
    assert 'vllm:prompt_tokens_total{model_name="llamaserve"} 5.0' in text


def test_engine_client_aborts_only_requests_left_unfinished():
    """A consumer that stops at the last output sends no abort (one spurious engine message per
    request before); one that leaves early does."""
    from llamaserve.server.engine_client import EngineClient
    from llamaserve.engine.args import EngineArgs

    class Sent(list):
        def put(self, msg):
            self.append(msg)

    async def go():
        client = EngineClient(EngineArgs(mock=True))
        client.state, client._in_q = "ready", Sent()
        for rid, leave_early in (("done", False), ("left", True)):
            gen = client.generate(rid, [1, 2], SamplingParams())
            first = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)
            client._dispatch([RequestOutput(rid, [5], "a"), RequestOutput(rid, [6], "b", finished=True,
                                                                             finish_reason=FinishReason.LENGTH)])
            assert (await first).text_delta == "a"
            if not leave_early:
                assert (await gen.__anext__()).finished
            await gen.aclose()
        return [(type(m).__name__, m.request_id) for m in client._in_q]

    assert asyncio.run(go()) == [("AddRequest", "done"), ("AddRequest", "left"), ("Abort", "left")]
