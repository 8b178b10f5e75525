"""The paged KV cache through a real server (mock model): the pool from --kv-cache-memory, a
prompt beyond it refused with 400, prefix-cache counters in /metrics, --no-prefix-cache; and
--kv-cache-dtype on the built-in model."""

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


@pytest.mark.parametrize("kv_dtype,element_bytes", [("float32", 4), ("fp8", 1)])
def test_the_kv_cache_dtype_flag_reaches_the_engine(tmp_path, kv_dtype, element_bytes):
    """The built-in model, its cache as asked: /status and the startup log say which, and the
    pool's bytes per token follow (fp8 on a CPU runs on the torch path, and still answers)."""
    tmp_path = tmp_path / kv_dtype
    tmp_path.mkdir()
    server = start_server(tmp_path, "--model", "builtin", "--no-auth", "--max-users", "2", "--max-seq-len", "256",
                          "--kv-cache-dtype", kv_dtype, secret=None)
    try:
        a = BUILTIN_MODEL_ARGS
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        status = httpx.get(f"{server.url}/status").json()  # engine stats of the last step
        name = {"float32": "float32", "fp8": "float8_e4m3fn"}[kv_dtype]
        assert status["kv_cache_dtype"] == name
        assert status["kv_bytes_per_token"] == 2 * a.n_layers * a.n_kv_heads * a.head_dim * element_bytes
        assert f"({name}, {status['kv_bytes_per_token']} bytes per token" in server.log_text()
    finally:
        server.stop()


def test_an_unknown_kv_cache_dtype_is_refused_at_the_command_line():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--kv-cache-dtype", "int3"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--kv-cache-dtype: invalid choice: 'int3'" in run.stderr
