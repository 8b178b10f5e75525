"""The original API over real HTTP: raw chunked stream, chat SSE, parameter errors, limits,
and 64 concurrent streaming clients on 32 slots matching the engine's offline output."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest


END = "<|endoftext|>"
ROUTE = "/inference/llama3-70b"


pytest_plugins = ["server_fixtures"]  # the session-wide `api_server`


@pytest.fixture
def server(api_server):
    return api_server


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=server.headers, timeout=30, **kw)


def stream_chunks(server, body, path=ROUTE) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", server.url + path, json=body, headers=server.headers, timeout=30) as r:
        chunks = [c for c in r.iter_text() if c]
    return r, chunks


def answer(server, body) -> str:
    r, chunks = stream_chunks(server, body)
    assert r.status_code == 200
    text = "".join(chunks)
    return text.split(END, 1)[0]


def test_raw_stream_is_chunked_and_ends_with_endoftext_then_stats(server):
    r, chunks = stream_chunks(server, {"text": "Tell me a story", "max_tokens": 8})
    assert r.status_code == 200
    assert r.headers.get("transfer-encoding") == "chunked"
    text = "".join(chunks)
    # text, <|endoftext|>, JSON stats (--send-user-stats), <|endoftext|>
    body, stats, tail = text.split(END)
    assert body and tail == ""
    stats = json.loads(stats)
    for key in ("user_ttft_ms", "user_tps", "prefill_tokens", "decode_tokens", "batch_size", "context_length"):
        assert key in stats
    assert stats["decode_tokens"] == 7  # 8 generated: the first comes from the prefill
    assert len(chunks) > 2  # streamed step by step, not in one piece


def test_chat_route_sends_cumulative_answers_then_close(server):
    with httpx.stream("POST", server.url + "/chat/llama3-70b", json={"text": "Hi", "max_tokens": 6},
                      headers=server.headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    kinds = [e.split("\n")[0] for e in events]
    assert kinds[-1] == "event: close"
    assert set(kinds[:-1]) == {"event: answer"} and len(kinds) >= 3
    messages = [json.loads(e.split("data: ", 1)[1])["message"] for e in events[:-1]]
    for a, b in zip(messages, messages[1:]):
        assert b.startswith(a) and len(b) > len(a)
    assert messages[-1] == answer(server, {"text": "Hi", "max_tokens": 6})


def test_stop_sequence_multi_token_and_null(server):
    full = answer(server, {"text": "Explain stops", "max_tokens": 9})
    # A stop string spanning token boundaries, taken from the middle of the known output.
    stop = full[len(full) // 3: len(full) // 3 + 6]
    assert len(stop) == 6
    cut = answer(server, {"text": "Explain stops", "max_tokens": 9, "stop_sequence": stop})
    assert cut == full[: full.index(stop)]
    # null is "no stop sequence", not the string "None"
    assert answer(server, {"text": "Explain stops", "max_tokens": 9, "stop_sequence": None}) == full


def test_max_tokens_and_return_prompt(server):
    short = answer(server, {"text": "Count", "max_tokens": 2})
    longer = answer(server, {"text": "Count", "max_tokens": 6})
    assert longer.startswith(short) and len(longer) > len(short)
    with_prompt = answer(server, {"text": "Count", "max_tokens": 2, "return_prompt": True})
    assert with_prompt == "Count" + short


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"not json", "JSON"),
        (b"[1, 2]", "JSON object"),
        ({}, "'text'"),
        ({"text": ""}, "'text'"),
        ({"text": "   "}, "'text'"),
        ({"text": 42}, "'text'"),
        ({"text": "x", "temperature": "hot"}, "'temperature'"),
        ({"text": "x", "temperature": True}, "'temperature'"),
        ({"text": "x", "temperature": 0}, "'temperature'"),
        ({"text": "x", "temperature": 100.5}, "'temperature'"),
        ({"text": "x", "top_p": 0.0}, "'top_p'"),
        ({"text": "x", "top_p": 1.01}, "'top_p'"),
        ({"text": "x", "top_k": 0}, "'top_k'"),
        ({"text": "x", "top_k": 1001}, "'top_k'"),
        ({"text": "x", "top_k": 2.5}, "'top_k'"),
        ({"text": "x", "max_tokens": 0}, "'max_tokens'"),
        ({"text": "x", "max_tokens": 2049}, "'max_tokens'"),
        ({"text": "x", "max_tokens": "10"}, "'max_tokens'"),
        ({"text": "x", "stop_sequence": 5}, "'stop_sequence'"),
        ({"text": "x", "return_prompt": "yes"}, "'return_prompt'"),
    ],
)
def test_bad_parameters_get_400_naming_them(server, body, needle):
    for path in (ROUTE, "/chat/llama3-70b"):
        r = post(server, path, body)
        assert r.status_code == 400, r.text
        assert needle in r.json()["message"]


def test_limits_413_and_prompt_too_long(server):
    r = post(server, ROUTE, {"text": "x" * 70000})
    assert r.status_code == 413 and "limit" in r.json()["message"]
    r = post(server, ROUTE, {"text": "word " * 400})
    assert r.status_code == 400
    assert "256" in r.json()["message"]  # names the context limit
    r = post(server, "/inference/not-a-model", {"text": "hi"})
    assert r.status_code == 404


def test_health_root_and_alias_route(server):
    assert httpx.get(server.url + "/health").text == "OK"
    assert httpx.get(server.url + "/").status_code == 200
    name = server.status()["model"]
    r, chunks = stream_chunks(server, {"text": "Hi", "max_tokens": 3}, path=f"/inference/{name}")
    assert r.status_code == 200 and END in "".join(chunks)


def queue_time_count(server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("vllm:request_queue_time_seconds_count")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_64_concurrent_streams_on_32_slots_match_offline_engine(server):
    from llamaserve.engine.engine import Engine, EngineConfig
    from llamaserve.engine.request import SamplingParams
    from llamaserve.model.mock import MockTransformer
    from llamaserve.tokenizer import load_tokenizer

    prompts = [f"Question {i}: what is {i} times {i + 3}?" for i in range(64)]
    body = {"max_tokens": 9, "top_k": 1}  # greedy

    async def one(client, text):
        parts = []
        async with client.stream("POST", server.url + ROUTE, json={"text": text, **body}, headers=server.headers) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_text():
                parts.append(chunk)
        return "".join(parts).split(END, 1)[0]

    async def run_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    before = queue_time_count(server)
    served = asyncio.run(run_all())
    # Every request was seated from the engine's queue once (half of them after waiting for a slot).
    assert queue_time_count(server) - before == 64

    tok = load_tokenizer(None)
    engine = Engine(MockTransformer(), tok, EngineConfig(max_users=32, max_seq_len=256))
    for i, p in enumerate(prompts):
        ids = tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        engine.add_request(str(i), ids, SamplingParams(max_tokens=9, top_k=1, top_p=0.9))
    offline = {str(i): "" for i in range(64)}
    while engine.has_unfinished():
        for out in engine.step():
            offline[out.request_id] += out.text_delta
    assert served == [offline[str(i)] for i in range(64)]
    assert len(set(served)) > 32  # prompts really got their own answers

    metrics = httpx.get(server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in metrics
    assert 'llamaserve:http_requests_total{method="POST",route="/inference/{name}",status="200"}' in metrics
