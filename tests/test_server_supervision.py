"""The server under stress, as a real subprocess: loading, overload, disconnects, the engine
process killed or hung mid-stream, printed token, logs, and SIGTERM drain."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from server_fixtures import ServerProcess, start_server

from llamaserve.model.mock import LOAD_GATE_ENV, PAUSE_ENV

pytestmark = pytest.mark.slow
STEP_S = 0.2  # mock step delay: slow enough to catch requests mid-flight


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(server) -> int:
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sup")
    loaded = tmp / "loaded"  # the mock finishes loading only once this file exists
    srv = ServerProcess(tmp / "server.log", "--mock", "--mock-step-delay", str(STEP_S), "--max-users", "3", "--no-resume",
                        "--max-queued", "1", "--max-seq-len", "512", "--engine-timeout", "3", "--drain-timeout", "15",
                        env={"CACHE_ROOT": str(tmp / "cache"), LOAD_GATE_ENV: str(loaded)}, secret=None)
    srv.first_health = wait_for(lambda: health_answer(srv), timeout=90, what="the port to answer")
    loaded.touch()
    wait_for(lambda: health(srv) == 200, timeout=90, what="health 200 once loaded")
    srv.cache_root = tmp / "cache"
    # The banner is printed on uvicorn's next tick after the engine turns ready (up to 0.1 s after
    # /health says 200), so wait for it rather than reading the log once.
    match = wait_for(lambda: re.search(r"Bearer (\S+?)'", srv.log_text()), timeout=10,
                     what="serve to print a token (JWT_SECRET is unset)")
    srv.auth = {"Authorization": f"Bearer {match.group(1)}"}
    yield srv
    srv.stop(signal.SIGKILL)


def health_answer(server):
    """(status, message) of /health, or None while the port is not answering."""
    assert server.proc.poll() is None, server.log_text()
    try:
        r = httpx.get(server.url + "/health", timeout=2)
    except httpx.HTTPError:
        return None
    return r.status_code, r.json().get("message") if r.status_code != 200 else None


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def abort_count(server) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    found = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def raw_request(server, path: str, body: dict) -> socket.socket:
    return raw_request_to(server.port, path, body, server.auth)


def raw_request_to(port: int, path: str, body: dict, headers: dict) -> socket.socket:
    """Sends a request and leaves the answer unread: the connection stays open until closed."""
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + data)
    return sock


def engine_counts(server) -> tuple[int, int]:
    s = server.status()
    return s.get("num_running", -1), s.get("num_waiting", -1)


LONG = {"prompt": "hold the slot", "max_tokens": 400, "ignore_eos": True}


def test_health_503_while_loading_then_printed_token_works(server):
    status, message = server.first_health  # the mock was held loading until then: no race
    assert status == 503 and "loading" in message
    r = httpx.post(server.url + "/inference/llama3-70b", json={"text": "xyzzy-private-prompt", "max_tokens": 3},
                   headers=server.auth, timeout=30)
    # Without --send-user-stats the stream ends with exactly one <|endoftext|>, no stats object.
    assert r.status_code == 200 and r.text.endswith("<|endoftext|>") and r.text.count("<|endoftext|>") == 1
    assert httpx.post(server.url + "/inference/llama3-70b", json={"text": "hi"}, timeout=10).status_code == 401


def test_logs_go_to_cache_root_without_prompts(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "xyzzy-private-prompt", "max_tokens": 2},
                   headers=server.auth, timeout=30)
    assert r.status_code == 200  # a prompt the server has seen, whichever test ran before
    files = list((server.cache_root / "logs").glob("*.log"))
    assert files, "no log file under CACHE_ROOT/logs"
    text = "".join(f.read_text() for f in files)
    assert "llamaserve starting" in text and "engine ready" in text
    assert "xyzzy-private-prompt" not in text + server.log_text()


def test_overload_gives_503_on_original_and_429_on_openai(server):
    holders = [raw_request(server, "/v1/completions", {**LONG, "stream": True}) for _ in range(4)]
    try:
        wait_for(lambda: engine_counts(server) == (3, 1), what="3 running + 1 waiting")
        r = httpx.post(server.url + "/inference/llama3-70b", json={"text": "one more"}, headers=server.auth, timeout=30)
        assert r.status_code == 503
        assert r.json() == {"message": "Service overloaded, try again later."}
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "one more"}, headers=server.auth, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for s in holders:
            s.close()
    wait_for(lambda: engine_counts(server) == (0, 0), what="all holders aborted")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_slot(server, stream):
    aborted_before = abort_count(server)
    sock = raw_request(server, "/v1/completions", {**LONG, "stream": stream})
    wait_for(lambda: engine_counts(server)[0] == 1, what="request running")
    sock.close()
    wait_for(lambda: engine_counts(server) == (0, 0), timeout=10, what="slot freed after disconnect")
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'^vllm:num_requests_running\{[^}]*\} 0\.0$', metrics, re.M)
    wait_for(lambda: abort_count(server) == aborted_before + 1, timeout=10, what="this abort counted")


def _stream_until_error(server, kill):
    """Starts an original-route stream and a chat SSE stream, calls kill() once both are
    producing, and returns what each client saw."""
    result = {}

    def raw_client():
        try:
            with httpx.stream("POST", server.url + "/inference/llama3-70b", headers=server.auth, timeout=60,
                              json={"text": "long story", "max_tokens": 9}) as r:
                for chunk in r.iter_text():
                    result.setdefault("raw_chunks", []).append(chunk)
            result["raw"] = "completed"
        except httpx.HTTPError as exc:
            result["raw"] = f"error: {type(exc).__name__}"

    def sse_client():
        with httpx.stream("POST", server.url + "/chat/llama3-70b", headers=server.auth, timeout=60,
                          json={"text": "long chat", "max_tokens": 9}) as r:
            result["sse_status"] = r.status_code
            result["sse"] = r.read().decode()

    def openai_client():
        import openai

        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.auth["Authorization"][7:], max_retries=0)
        try:
            for _ in client.completions.create(model="llamaserve-mock", prompt="long", max_tokens=9, stream=True):
                pass
            result["openai"] = "completed"
        except openai.APIError as exc:
            result["openai"] = f"error: {exc}"

    threads = [threading.Thread(target=f) for f in (raw_client, sse_client, openai_client)]
    for t in threads:
        t.start()
    wait_for(lambda: result.get("raw_chunks"), what="first chunk")
    kill()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung after the engine failed"
    return result


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_engine_failure_mid_stream_errors_clients_and_restarts(server, how):
    old = server.status()
    pid = old["engine_pid"]
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    result = _stream_until_error(server, lambda: os.kill(pid, sig))
    # The raw stream breaks (no clean <|endoftext|>).
    assert result["raw"].startswith("error") or "<|endoftext|>" not in "".join(result["raw_chunks"])
    # The official client raises (error object in the stream, or a 5xx if it had not started).
    assert result["openai"].startswith("error") and "engine" in result["openai"]
    # The SSE stream carries an error event, or, if it had not started yet, a 5xx says why.
    if result["sse_status"] == 200:
        assert "event: error" in result["sse"] and "event: close" in result["sse"]
    else:
        assert result["sse_status"] >= 500 and "engine" in result["sse"]
    wait_for(lambda: health(server) == 503, timeout=20, what="health 503")
    wait_for(lambda: health(server) == 200, timeout=90, what="health 200 after restart")
    new = server.status()
    assert new["engine_pid"] != pid and new["engine_restarts"] == old["engine_restarts"] + 1
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "after restart", "max_tokens": 3},
                   headers=server.auth, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_stopped_engine_is_unhealthy_within_seconds_and_refuses_new_requests(server):
    """Issue 15, D10: a hung engine (SIGSTOP) stayed invisible for 120 s although it beats every
    0.5 s. Now /health is 503 as soon as the beat is 2 s late, a new request gets a 503 saying
    why at once, and the engine is restarted after the default hang timeout (5 s)."""
    pid = server.status()["engine_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = wait_for(lambda: (lambda h: h if h.status_code == 503 else None)(httpx.get(server.url + "/health", timeout=5)),
                     timeout=5, what="health 503 within 5 s of SIGSTOP")
        assert "not responding" in r.json()["message"] or "restarting" in r.json()["message"]
        assert time.monotonic() - start < 5
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "during the hang", "max_tokens": 2},
                       headers=server.auth, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and time.monotonic() - t0 < 2
        assert "not responding" in r.json()["error"]["message"] or "restarting" in r.json()["error"]["message"]
        wait_for(lambda: server.status()["engine_pid"] != pid, timeout=15, what="engine restarted")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: health(server) == 200, timeout=90, what="health 200 after restart")
    assert "no heartbeat for 5 s" in server.log_text()


def paused_server(tmp_path, *args):
    """A server of its own (the test ends it) whose mock holds every step while tmp_path/pause exists."""
    pause = tmp_path / "pause"
    srv = start_server(tmp_path, "--mock", "--no-auth", "--engine-timeout", "300", *args,
                       env={PAUSE_ENV: str(pause)}, secret=None)
    return srv, pause


def test_sigterm_drains_then_exits_0(tmp_path):
    """SIGTERM: the port stays open but new requests get 503 (each API's error format) and
    /health says "shutting down", while a running stream finishes; then a clean exit."""
    import openai

    srv, pause = paused_server(tmp_path, "--drain-timeout", "120")
    result = {}

    def client():
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        parts = []
        for chunk in c.completions.create(model="llamaserve-mock", prompt="finish me", max_tokens=12,
                                          stream=True, extra_body={"ignore_eos": True}):
            parts += [ch.text for ch in chunk.choices]
        result["parts"] = parts
        result["finish"] = chunk.choices[0].finish_reason

    t = threading.Thread(target=client)
    try:
        pause.touch()  # the engine takes no step until the checks below are done: no race
        t.start()
        wait_for(lambda: srv.status()["in_flight"] == 1, what="stream in flight")
        srv.proc.send_signal(signal.SIGTERM)
        r = wait_for(lambda: (lambda h: h if h.status_code == 503 else None)(httpx.get(srv.url + "/health", timeout=5)),
                     timeout=10, what="health 503")
        assert r.json() == {"message": "shutting down"}
        r = httpx.post(srv.url + "/inference/llama3-70b", json={"text": "too late"}, timeout=10)
        assert r.status_code == 503 and "shutting down" in r.json()["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "too late"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert t.is_alive() and srv.proc.poll() is None  # the drain waits for the held stream
        pause.unlink()
        t.join(60)
        assert len(result["parts"]) == 12 and result["finish"] == "length"
        assert srv.proc.wait(30) == 0
        log = srv.log_text()
        assert "drained" in log and "Application shutdown complete" in log and "engine shutting down" in log
    finally:
        pause.unlink(missing_ok=True)
        srv.stop(signal.SIGKILL)


def test_a_second_signal_stops_at_once(tmp_path):
    """README: a second signal stops at once, without waiting for running requests to drain."""
    srv, pause = paused_server(tmp_path, "--drain-timeout", "300")
    sock = None
    try:
        engine_pid = srv.status()["engine_pid"]
        pause.touch()
        sock = raw_request_to(srv.port, "/v1/completions", {**LONG, "stream": True}, {})
        wait_for(lambda: srv.status()["in_flight"] == 1, what="stream in flight")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health_answer(srv) == (503, "shutting down"), timeout=10, what="draining")
        assert srv.proc.poll() is None  # draining: the held stream could keep it up for 300 s
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(30)  # raises if the second signal did not stop it
        assert "drained" not in srv.log_text()
        pause.unlink()
        wait_for(lambda: not alive(engine_pid), timeout=30, what="the engine process to exit")
    finally:
        pause.unlink(missing_ok=True)
        if sock is not None:
            sock.close()
        srv.stop(signal.SIGKILL)


def test_drain_timeout_cuts_a_long_request_and_still_exits_0(tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--mock", "--mock-step-delay", str(STEP_S), "--drain-timeout", "1",
                        "--no-auth", secret=None)
    try:
        srv.wait_healthy()
        sock = raw_request_to(srv.port, "/v1/completions", {**LONG, "stream": True}, {})
        wait_for(lambda: engine_counts(srv)[0] == 1, what="request running")
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        assert time.monotonic() - start < 1 + 3 + 5  # drain timeout + flush time + engine stop
        assert "drain timeout" in srv.log_text()
        sock.close()
    finally:
        srv.stop(signal.SIGKILL)
