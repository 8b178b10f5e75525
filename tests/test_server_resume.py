"""Transparent resume (server/resume.py): the engine process is killed mid-stream and every
client's stream pauses, then goes on to the text an uninterrupted run gives; a request the engine
is lost with twice is failed alone. Real servers, real HTTP clients, real process kills."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server_fixtures import start_server

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# 8 requests over both APIs: greedy and seeded sampling, raw text, SSE and OpenAI streams.
MAX_TOKENS = 24
REQUESTS = [
    ("/inference/llama3-70b", {"text": "Tell me about rivers", "top_k": 1, "max_tokens": MAX_TOKENS}),
    ("/chat/llama3-70b", {"text": "And about mountains", "top_k": 1, "max_tokens": MAX_TOKENS}),
    ("/v1/completions", {"prompt": "The history of", "temperature": 0, "max_tokens": MAX_TOKENS}),
    ("/v1/completions", {"prompt": "Once upon a time", "temperature": 0.9, "seed": 11, "max_tokens": MAX_TOKENS}),
    ("/v1/completions", {"prompt": "A list of fruit:", "temperature": 1.0, "top_p": 0.9, "seed": 5,
                         "max_tokens": MAX_TOKENS, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "temperature": 0,
                              "max_tokens": MAX_TOKENS}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "write a poem"}], "temperature": 0.7,
                              "seed": 3, "max_tokens": MAX_TOKENS}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "count"}], "temperature": 1.2,
                              "top_k": 40, "seed": 9, "max_tokens": MAX_TOKENS, "frequency_penalty": 0.5}),
]


def run_stream(server, path: str, body: dict, progress: list, result: dict, key: int) -> None:
    """Streams one request; the text it ends with (or the error) goes to result[key]."""
    openai = path.startswith("/v1/")
    body = {**body, "stream": True, **({"ignore_eos": True} if openai else {})}
    text, chunks = "", 0
    try:
        with httpx.stream("POST", server.url + path, json=body, headers=server.headers, timeout=300) as r:
            assert r.status_code == 200, r.read()
            if path.startswith("/inference/"):
                for piece in r.iter_text():
                    text += piece
                    chunks += 1
                    progress[key] = chunks
                text = text.removesuffix("<|endoftext|>") if text.endswith("<|endoftext|>") else "BROKEN:" + text
            else:
                event = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]" or event == "close":
                        break
                    obj = json.loads(data)
                    if "error" in obj or event == "error":
                        raise RuntimeError(str(obj))
                    if path.startswith("/chat/"):
                        text = obj.get("message", text)
                    elif path == "/v1/completions":
                        text += obj["choices"][0]["text"]
                    else:
                        text += obj["choices"][0]["delta"].get("content") or ""
                    chunks += 1
                    progress[key] = chunks
        result[key] = text
    except Exception as exc:  # noqa: BLE001 - reported by the test
        result[key] = f"ERROR: {type(exc).__name__}: {exc}"


def run_all(server, kill=None) -> list[str]:
    progress, result = [0] * len(REQUESTS), {}
    threads = [threading.Thread(target=run_stream, args=(server, p, b, progress, result, i))
               for i, (p, b) in enumerate(REQUESTS)]
    for t in threads:
        t.start()
    if kill is not None:
        wait_for(lambda: all(c >= 3 for c in progress), what="every stream under way")
        kill()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return [result[i] for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    # The built-in model (real weights path, seeded random weights); slow steps so the kill lands mid-stream.
    srv = start_server(tmp_path_factory.mktemp("resume"), "--max-users", "8", "--max-seq-len", "128")
    yield srv
    srv.stop()


def test_every_stream_survives_an_engine_crash_with_the_text_of_an_uninterrupted_run(builtin):
    expected = run_all(builtin)
    assert all(not t.startswith(("ERROR", "BROKEN")) and t for t in expected), expected
    pid = builtin.status()["engine_pid"]
    got = run_all(builtin, kill=lambda: os.kill(pid, signal.SIGKILL))
    status = builtin.status()
    assert status["engine_pid"] != pid and status["engine_restarts"] >= 1, "the engine was not restarted"
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have == want, f"request {i} {REQUESTS[i][0]}: {have!r} != {want!r}"


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("resume-mock"), "--mock", "--mock-step-delay", "0.1",
                       "--max-users", "4", "--max-seq-len", "512")
    yield srv
    srv.stop()


def stream_completion(server, body: dict, out: dict, key: str) -> None:
    parts = []
    try:
        with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=300,
                          json={**body, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    obj = json.loads(line[5:])
                    if "error" in obj:
                        out[key] = "ERROR: " + obj["error"]["message"]
                        return
                    parts.append(obj["choices"][0]["text"])
                    out[key + "_n"] = len(parts)
        out[key] = "".join(parts)
    except httpx.HTTPError as exc:
        out[key] = f"ERROR: {exc}"


def test_a_request_lost_twice_is_failed_alone(mock):
    """P runs through two engine losses: it is failed with an error saying so, while S (lost with
    P the first time) and T (lost with P the second time) both finish with their full text."""
    pid = mock.status()["engine_pid"]
    out: dict = {}
    # Greedy: the mock's logits leave a sampled token a 1-in-4000 chance to differ between runs.
    bodies = {"P": {"prompt": "poison", "max_tokens": 150, "temperature": 0},
              "S": {"prompt": "short", "max_tokens": 12, "temperature": 0},
              "T": {"prompt": "third", "max_tokens": 40, "temperature": 0}}
    expected = {k: httpx.post(mock.url + "/v1/completions", json={**b, "ignore_eos": True}, headers=mock.headers,
                              timeout=120).json()["choices"][0]["text"] for k, b in bodies.items() if k != "P"}
    threads = {k: threading.Thread(target=stream_completion, args=(mock, bodies[k], out, k)) for k in ("P", "S")}
    for t in threads.values():
        t.start()
    wait_for(lambda: out.get("P_n", 0) >= 2 and out.get("S_n", 0) >= 2, what="P and S streaming")
    os.kill(pid, signal.SIGKILL)
    threads["S"].join(120)
    assert out["S"] == expected["S"]  # resumed and finished
    pid = wait_for(lambda: (lambda s: s["engine_pid"] if s["engine_pid"] != pid and s["engine_state"] == "ready"
                            else None)(mock.status()), what="engine back")
    threads["T"] = threading.Thread(target=stream_completion, args=(mock, bodies["T"], out, "T"))
    threads["T"].start()
    wait_for(lambda: out.get("T_n", 0) >= 2, what="T streaming")
    assert "P" not in out, "P should still be running"
    os.kill(pid, signal.SIGKILL)
    for t in threads.values():
        t.join(120)
    assert out["P"].startswith("ERROR") and "lost 2 times" in out["P"]
    assert out["T"] == expected["T"]
    assert httpx.get(mock.url + "/health", timeout=5).status_code in (200, 503)
    wait_for(lambda: httpx.get(mock.url + "/health", timeout=5).status_code == 200, what="healthy again")


def test_a_stream_in_flight_during_a_hang_resumes_after_the_restart(mock):
    """SIGSTOP: the heartbeat stops, the engine is restarted after the hang timeout (5 s) and the
    stream goes on to its full text, well before the old 120 s."""
    body = {"prompt": "hang on", "max_tokens": 30, "temperature": 0}
    expected = httpx.post(mock.url + "/v1/completions", json={**body, "ignore_eos": True}, headers=mock.headers,
                          timeout=120).json()["choices"][0]["text"]
    pid = wait_for(lambda: (lambda s: s["engine_pid"] if s["engine_state"] == "ready" else None)(mock.status()),
                   what="engine ready")
    out: dict = {}
    t = threading.Thread(target=stream_completion, args=(mock, body, out, "A"))
    t.start()
    wait_for(lambda: out.get("A_n", 0) >= 2, what="streaming")
    start = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        t.join(90)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert out["A"] == expected
    assert time.monotonic() - start < 60


def test_requests_lost_together_twice_run_one_at_a_time_until_the_culprit_is_found(mock):
    """A and B are both lost in two crashes: neither can be blamed, so they run again one at a
    time; the one running at the third loss is failed, the other finishes its full text."""
    bodies = {k: {"prompt": f"doubt {k}", "max_tokens": 120, "temperature": 0} for k in "AB"}
    expected = {k: httpx.post(mock.url + "/v1/completions", json={**b, "ignore_eos": True}, headers=mock.headers,
                              timeout=120).json()["choices"][0]["text"] for k, b in bodies.items()}
    out: dict = {}

    def engine_pid(old=None):
        return wait_for(lambda: (lambda s: s["engine_pid"] if s["engine_state"] == "ready" and s["engine_pid"] != old
                                 else None)(mock.status()), what="engine ready")

    threads = {k: threading.Thread(target=stream_completion, args=(mock, bodies[k], out, k)) for k in "AB"}
    for t in threads.values():
        t.start()
    pid = engine_pid()
    for _ in range(2):
        seen = {k: out.get(k + "_n", 0) for k in "AB"}
        wait_for(lambda: all(out.get(k + "_n", 0) >= seen[k] + 2 for k in "AB"), what="both streaming")
        os.kill(pid, signal.SIGKILL)
        pid = engine_pid(pid)
    seen = {k: out.get(k + "_n", 0) for k in "AB"}
    running = wait_for(lambda: next((k for k in "AB" if out.get(k + "_n", 0) >= seen[k] + 2), None),
                       what="one of them running alone")
    other = "B" if running == "A" else "A"
    assert out.get(other + "_n", 0) == seen[other], "both ran at once"
    os.kill(pid, signal.SIGKILL)
    for t in threads.values():
        t.join(180)
    assert out[running].startswith("ERROR") and "lost 3 times" in out[running]
    assert out[other] == expected[other]


def test_a_non_streamed_request_survives_an_engine_crash_with_the_whole_usage(mock):
    body = {"prompt": "not streamed", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(mock.url + "/v1/completions", json=body, headers=mock.headers, timeout=120).json()
    pid = wait_for(lambda: (lambda s: s["engine_pid"] if s["engine_state"] == "ready" else None)(mock.status()),
                   what="engine ready")
    out: dict = {}

    def client():
        out["r"] = httpx.post(mock.url + "/v1/completions", json=body, headers=mock.headers, timeout=300)

    t = threading.Thread(target=client)
    t.start()
    wait_for(lambda: mock.status()["num_running"] == 1, what="request running")
    time.sleep(1)  # some tokens generated (0.1 s a step)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = out["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    assert r.json()["usage"] == expected["usage"] and r.json()["usage"]["completion_tokens"] == 40
    assert mock.status()["engine_pid"] != pid


def test_no_resume_fails_the_streams_as_before(tmp_path):
    srv = start_server(tmp_path, "--mock", "--mock-step-delay", "0.1", "--no-resume")
    try:
        out: dict = {}
        t = threading.Thread(target=stream_completion, args=(srv, {"prompt": "x", "max_tokens": 100}, out, "A"))
        t.start()
        wait_for(lambda: out.get("A_n", 0) >= 2, what="streaming")
        os.kill(srv.status()["engine_pid"], signal.SIGKILL)
        t.join(60)
        assert out["A"].startswith("ERROR") and "engine" in out["A"]
    finally:
        srv.stop()
