"""Per-team quotas from the token's team_id (--quota-config), over real HTTP against a mock-model
server: a team over a limit gets 429 (OpenAI) or 503 (original) with Retry-After while another
team is served; a flooding team cannot delay another team's request by more than a batch; usage
per team in /metrics and in /usage (admin tokens only); the file is re-read on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from llamaserve.server.auth import encode_token
from llamaserve.server.quotas import parse_quota_config
from server_fixtures import SECRET, start_server

QUOTAS = {
    "default": {"max_tokens": 64},
    "teams": {
        "thirsty": {"tokens_per_minute": 40},
        "small": {"max_tokens": 5, "concurrent_requests": 1, "requests_per_minute": 4},
        "flood": {},
    },
}


def auth(team: str, **claims) -> dict[str, str]:
    return {"Authorization": "Bearer " + encode_token({"team_id": team, **claims}, SECRET)}


@pytest.mark.parametrize("text,why", [
    ("{", "not valid JSON"),
    ('{"teams": {"a": {"tokens_per_hour": 5}}}', "unknown limit(s) tokens_per_hour"),
    ('{"default": {"max_tokens": 0}}', "default.max_tokens must be a positive integer"),
    ('{"default": {"max_tokens": true}}', "must be a positive integer"),
    ('{"teams": []}', '"teams" must be an object'),
    ('{"team": {}}', 'must be an object with "default"'),
])
def test_a_bad_quota_file_is_a_one_line_error(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_quota_config(text)


def test_serve_refuses_a_quota_file_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "quotas.fifo"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--mock", "--no-auth", "--quota-config", str(fifo)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a regular file" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quotas")
    path = tmp / "quotas.json"
    path.write_text(json.dumps(QUOTAS))
    srv = start_server(tmp, "--mock", "--mock-step-delay", "0.05", "--max-users", "2", "--max-seq-len", "256",
                       "--quota-config", str(path))
    srv.quota_path = path
    yield srv
    srv.stop()


def complete(server, team: str, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4, **body},
                      headers=auth(team), timeout=60)


@pytest.mark.slow
def test_a_team_over_its_token_limit_waits_while_another_is_served(server):
    for _ in range(20):
        r = complete(server, "thirsty", max_tokens=8)
        if r.status_code != 200:
            break
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "quota_exceeded" and "40 tokens per minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    r = httpx.post(server.url + "/inference/llama3-70b", json={"text": "hi", "max_tokens": 4},
                   headers=auth("thirsty"), timeout=60)
    assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 60
    assert "tokens per minute" in r.json()["message"]
    assert complete(server, "other").status_code == 200


@pytest.mark.slow
def test_max_tokens_concurrency_and_request_rate_limits(server):
    r = complete(server, "small", max_tokens=6)
    assert r.status_code == 400 and "over team 'small'" in r.json()["error"]["message"]
    # Not chosen by the client (chat: the rest of the context): lowered to the team's limit.
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                   "ignore_eos": True}, headers=auth("small"), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    r = complete(server, "small", n=2)  # two generations at once, one allowed
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "limit is 1 at once" in r.json()["error"]["message"]
    for _ in range(3):  # requests 2 to 4 of the minute
        assert complete(server, "small").status_code == 200
    r = complete(server, "small")
    assert r.status_code == 429 and "4 requests per minute" in r.json()["error"]["message"]
    assert 30 <= int(r.headers["retry-after"]) <= 60


@pytest.mark.slow
def test_a_flooding_team_does_not_delay_another_team_by_more_than_a_batch(server):
    finished: list[str] = []

    async def one(client, team: str, i: int) -> None:
        r = await client.post("/v1/completions", json={"prompt": f"flood {i}", "max_tokens": 4, "ignore_eos": True},
                              headers=auth(team))
        assert r.status_code == 200, r.text
        finished.append(team)

    async def run() -> int:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            flood = [asyncio.create_task(one(client, "flood", i)) for i in range(100)]
            while len(finished) < 4:  # the flood is queued and running
                await asyncio.sleep(0.05)
            before = len(finished)
            await one(client, "other", 0)
            ahead = len(finished) - 1 - before
            await asyncio.gather(*flood)
            return ahead

    ahead = asyncio.run(run())
    # 2 slots: the other team's request waits for at most the slots already taken plus one turn
    # of the rotation, not for the ~90 flood requests queued before it.
    assert ahead <= 2 * 2 + 1, f"{ahead} flood requests finished while the other team's single one waited"
    assert len(finished) == 101


@pytest.mark.slow
def test_usage_per_team_in_metrics_and_for_admins_only(server):
    assert complete(server, "reporting").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'^llamaserve:team_requests_total\{team="reporting"\} [1-9]', metrics, re.M)
    assert re.search(r'^llamaserve:team_prompt_tokens_total\{team="reporting"\} [1-9]', metrics, re.M)
    assert re.search(r'^llamaserve:team_generation_tokens_total\{team="reporting"\} 4\.0$', metrics, re.M)
    assert httpx.get(server.url + "/usage").status_code == 401
    r = httpx.get(server.url + "/usage", headers=auth("reporting"))
    assert r.status_code == 403 and "admin" in r.json()["message"]
    r = httpx.get(server.url + "/usage", headers=auth("ops", admin=True))
    assert r.status_code == 200
    team = r.json()["teams"]["reporting"]
    assert team["requests"] == 1 and team["generation_tokens"] == 4 and team["prompt_tokens"] > 0
    assert team["limits"]["max_tokens"] == 64


@pytest.mark.slow
def test_the_quota_file_is_read_again_on_sighup(server):
    admin = auth("ops", admin=True)
    server.quota_path.write_text(json.dumps({**QUOTAS, "default": {"max_tokens": 32}}))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/usage", headers=admin).json()["teams"]["flood"]["limits"]["max_tokens"] != 32:
        assert time.monotonic() < deadline, "the new quota file was not read"
        time.sleep(0.1)
    assert complete(server, "ops", max_tokens=33).status_code == 400
    server.quota_path.write_text("{not json")  # a broken file keeps the limits in force
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert server.proc.poll() is None and "keeping the limits in force" in server.log_text()
    assert complete(server, "ops", max_tokens=33).status_code == 400
    server.quota_path.write_text(json.dumps(QUOTAS))
    server.proc.send_signal(signal.SIGHUP)
