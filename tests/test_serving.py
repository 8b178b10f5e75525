"""Both APIs' serving layers without HTTP (server/serving_openai.py, serving_original.py) against a
scripted engine handle and the real Llama 3 tokenizer, and the OpenAI wire format's pure
functions (server/openai_format.py). The HTTP tests (test_server_*.py) cover the same paths end
to end; these pin the formatting and the error mapping down directly."""

from __future__ import annotations

import asyncio
import json

import pytest

from llamaserve.engine.request import FinishReason, RequestOutput, TokenLogprob
from llamaserve.server import openai_format as fmt
from llamaserve.server.errors import EngineFailed, EngineOverloaded
from llamaserve.server.protocol import ApiError
from llamaserve.server.serving_openai import OpenAIServing
from llamaserve.server.serving_original import END, OriginalServing
from llamaserve.server.settings import ServerSettings
from llamaserve.server.state import ServerState
from llamaserve.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer(None)


class ScriptedEngine:
    """An engine handle whose generate() yields (or raises) the scripted items, a script per call."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.stats = {"num_running": 1}
        self.info = {"is_builtin": True}
        self.state = "ready"
        self.ready = True
        self.num_in_flight = 0
        self.params = []

    async def generate(self, request_id, prompt_ids, params):
        self.params.append(params)
        for item in self.scripts.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def out(text, finished=False, reason=None, n=1, logprobs=None):
    return RequestOutput("r", [1] if text else [], text, finished=finished, finish_reason=reason,
                         completion_tokens=n, logprobs=logprobs)


def make_state(engine, **settings) -> ServerState:
    state = ServerState(ServerSettings(no_auth=True, model_name="m", **settings), engine, None)
    state.tokenizer = TOKENIZER
    state.model_name = "m"
    return state


def openai(engine, body: dict, chat: bool = False):
    serving = OpenAIServing(make_state(engine))

    async def go():
        sub = await serving.submit(serving.parse(json.dumps(body).encode(), chat))
        if body.get("stream"):
            return [e async for e in serving.stream(sub)]
        return await serving.collect(sub)

    return asyncio.run(go())


def test_completion_with_echo_collects_text_usage_and_finish_reason():
    engine = ScriptedEngine([out("A"), out("B", True, FinishReason.LENGTH, n=2)])
    body = openai(engine, {"prompt": "Hello", "max_tokens": 2, "echo": True})
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "text": "HelloAB", "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(TOKENIZER.encode("Hello", bos=True))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2}


def test_chat_stream_events_in_order_with_usage_last():
    engine = ScriptedEngine([out("Hi"), out(""), out("!", True, FinishReason.STOP, n=2)])
    events = openai(engine, {"messages": [{"role": "user", "content": "x"}], "stream": True,
                             "stream_options": {"include_usage": True}}, chat=True)
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [b["choices"][0]["delta"] if b["choices"] else None for b in bodies] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {"content": "!"}, None]
    assert bodies[-2]["choices"][0]["finish_reason"] == "stop" and bodies[-1]["usage"]["completion_tokens"] == 2
    assert all(b["object"] == "chat.completion.chunk" and b["id"].startswith("chatcmpl-") for b in bodies)
    # Without max_tokens a chat request may use the whole context.
    assert engine.params[0].max_tokens == 4096 - len(TOKENIZER.encode_chat([{"role": "user", "content": "x"}]))


@pytest.mark.parametrize("body, chat, status, code", [
    ({"prompt": "x", "model": "other"}, False, 404, "model_not_found"),
    ({"prompt": "x"}, False, 429, "rate_limit_exceeded"),
    ({"prompt": [5, 10_000_000]}, False, 400, None),  # a token id outside the vocabulary
])
def test_openai_refusals_are_api_errors(body, chat, status, code):
    with pytest.raises(ApiError) as info:
        openai(ScriptedEngine([EngineOverloaded("full")]), body, chat)
    assert (info.value.status, info.value.code) == (status, code)


def test_engine_failure_mid_stream_ends_with_an_error_event_and_no_done():
    events = openai(ScriptedEngine([out("a"), EngineFailed("boom")]), {"prompt": "x", "stream": True})
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "engine_failed"
    assert "data: [DONE]\n\n" not in events
    with pytest.raises(ApiError, match="the engine failed: boom") as info:
        openai(ScriptedEngine([out("a"), EngineFailed("boom")]), {"prompt": "x"})
    assert info.value.status == 500


def test_n_choices_get_their_own_seeds():
    engine = ScriptedEngine(*[[out("x", True, FinishReason.STOP)]] * 3)
    body = openai(engine, {"prompt": "x", "n": 3, "seed": 5, "temperature": 1})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(p.seed for p in engine.params) == [5, 6, 7]


def original(engine, body: dict, chat: bool, **settings) -> list[str]:
    serving = OriginalServing(make_state(engine, **settings))

    async def go():
        started = await serving.submit(json.dumps(body).encode())
        stream = serving.chat(started) if chat else serving.inference(started)
        return [part async for part in stream]

    return asyncio.run(go())


def test_original_inference_text_end_and_user_stats():
    parts = original(ScriptedEngine([out("A"), out("B", True, FinishReason.STOP, n=2)]),
                     {"text": "hi", "return_prompt": True}, chat=False, send_user_stats=True)
    assert parts[:4] == ["hi", "A", "B", END] and parts[-1] == END
    assert json.loads(parts[4])["decode_tokens"] == 1


def test_original_chat_sends_the_cumulative_message_then_close():
    parts = original(ScriptedEngine([out("A"), out("B", True, FinishReason.STOP, n=2)]), {"text": "hi"}, chat=True)
    assert parts == ['event: answer\ndata: {"message": "A"}\n\n', 'event: answer\ndata: {"message": "AB"}\n\n',
                     "event: close\ndata: {}\n\n"]
    parts = original(ScriptedEngine([out("A"), EngineFailed("boom")]), {"text": "hi"}, chat=True)
    assert parts[-2:] == ['event: error\ndata: {"message": "the engine failed: boom"}\n\n', "event: close\ndata: {}\n\n"]


def test_original_failures_and_refusals():
    with pytest.raises(EngineFailed):
        original(ScriptedEngine([out("A"), EngineFailed("boom")]), {"text": "hi"}, chat=False)
    # Overloaded twice (the first is retried after the back-off): 503 with the original's message.
    with pytest.raises(ApiError, match="Service overloaded") as info:
        original(ScriptedEngine([EngineOverloaded("full")], [EngineOverloaded("full")]), {"text": "hi"}, chat=False,
                 overload_backoff_s=0.01)
    assert info.value.status == 503
    with pytest.raises(ApiError) as info:
        OriginalServing(make_state(ScriptedEngine())).check_route("llama2-70b")
    assert info.value.status == 404


def test_logprob_formatting():
    a, b = TOKENIZER.encode("Hello", bos=False)[0], TOKENIZER.encode(" world", bos=False)[0]
    lps = [TokenLogprob(a, -0.5, [(a, -0.5), (b, -1.5)]), TokenLogprob(b, -0.25, [(b, -0.25)])]
    legacy = fmt.completion_logprobs(TOKENIZER, lps, offset=3)
    assert legacy == {"tokens": ["Hello", " world"], "token_logprobs": [-0.5, -0.25],
                      "top_logprobs": [{"Hello": -0.5, " world": -1.5}, {" world": -0.25}], "text_offset": [3, 8]}
    chat = fmt.chat_logprobs(TOKENIZER, lps[1:])["content"][0]
    assert chat == {"token": " world", "logprob": -0.25, "bytes": list(b" world"),
                    "top_logprobs": [{"token": " world", "logprob": -0.25, "bytes": list(b" world")}]}
    ids = TOKENIZER.encode("Hello world", bos=True)
    # The echoed text has no BOS: the BOS and the first word both start at 0.
    assert fmt.prompt_offsets(TOKENIZER, ids, "Hello world") == [0, 0, 5]


def test_stream_deltas_skip_empty_outputs_and_carry_the_finish_reason():
    assert fmt.chat_delta(0, out(""), None) is None and fmt.text_delta(0, out(""), None) is None
    assert fmt.chat_delta(1, out("", True, FinishReason.LENGTH), None) == {
        "index": 1, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert fmt.text_delta(0, out("x"), None) == {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}
    assert fmt.finish_reason(out("x", True, None)) == "stop"
    assert fmt.usage([[1, 2], [3]], 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
