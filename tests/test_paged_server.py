"""The paged KV cache through a real server (mock model): the pool from --kv-cache-memory, a
prompt beyond it refused with 400, prefix-cache counters in /metrics, --no-prefix-cache."""

import httpx
import pytest
import torch
from server_fixtures import start_server

from llamaserve.config import BUILTIN_MODEL_ARGS
from llamaserve.model.kv_cache import kv_bytes_per_token

pytestmark = pytest.mark.slow

BLOCKS = 40  # 640 tokens
SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 30


def budget_gib(blocks: int) -> str:
    a = BUILTIN_MODEL_ARGS
    return repr(blocks * 16 * kv_bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, torch.float32) / 2**30)


def serve(tmp_path, *extra):
    tmp_path.mkdir()
    return start_server(tmp_path, "--mock", "--no-auth", "--max-users", "4", "--max-seq-len", "2048",
                        "--prefill-chunk", "64", "--kv-cache-memory", budget_gib(BLOCKS), *extra, secret=None)


def metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    return float(lines[0].rsplit(" ", 1)[1])


def complete(url: str, prompt: str) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "llamaserve-mock", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0}, timeout=60)
    return {"status": r.status_code, **r.json()}


def test_pool_prefix_cache_and_limits_over_http(tmp_path):
    server = serve(tmp_path / "cached")
    try:
        assert "the KV cache holds 640 tokens" in server.log_text()
        too_long = complete(server.url, "hello " * 700)
        assert too_long["status"] == 400
        assert "context limit is 640 tokens" in too_long["error"]["message"]  # the pool's, not --max-seq-len's

        first = complete(server.url, SYSTEM + "Question one?")
        second = complete(server.url, SYSTEM + "Question two?")
        assert first["status"] == second["status"] == 200
        status = httpx.get(f"{server.url}/status").json()  # engine stats of the last step
        assert status["kv_tokens"] == BLOCKS * 16 and status["max_seq_len"] == BLOCKS * 16
        metrics = httpx.get(f"{server.url}/metrics").text
        hits = metric(metrics, "vllm:prefix_cache_hits_total")
        queries = metric(metrics, "vllm:prefix_cache_queries_total")
        assert hits >= 256 and hits % 64 == 0  # whole prefill chunks of the shared system prompt
        assert queries == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        assert 0 <= metric(metrics, "vllm:kv_cache_usage_perc") <= 1
    finally:
        server.stop()

    plain = serve(tmp_path / "plain", "--no-prefix-cache")
    try:
        again = complete(plain.url, SYSTEM + "Question two?")
        assert again["choices"][0]["text"] == second["choices"][0]["text"]
        assert metric(httpx.get(f"{plain.url}/metrics").text, "vllm:prefix_cache_hits_total") == 0
    finally:
        plain.stop()
