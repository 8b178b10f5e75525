"""The limits every request is held to, each attack of issue 15 replayed over real HTTP against a
mock-model server: huge integers, deep nesting, lone surrogates, fan-out, stop strings, slow
headers and connection floods get a clear 4xx (or a closed connection), never a 500 or a broken
stream, and the server stays healthy."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from server_fixtures import start_server

pytestmark = pytest.mark.slow
POSTS = ["/inference/llama3-70b", "/chat/llama3-70b", "/v1/completions", "/v1/chat/completions", "/tokenize",
         "/detokenize"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("limits"), "--mock", "--mock-step-delay", "0.05", "--max-users", "2",
                       "--max-queued", "2", "--max-seq-len", "256", "--max-choices", "8", "--header-timeout", "1",
                       "--max-connections", "12")
    yield srv
    srv.stop()


def post(server, path: str, content: bytes | str, timeout: float = 30) -> httpx.Response:
    headers = {**server.headers, "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def message(r: httpx.Response) -> str:
    body = r.json()
    return body["message"] if "message" in body else body["error"]["message"]


def assert_healthy(server) -> None:
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "still fine", "max_tokens": 2},
                   headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", POSTS)
def test_huge_integer_and_deep_nesting_are_400(server, path):
    r = post(server, path, '{"max_tokens": ' + "9" * 5000 + ', "text": "hi", "prompt": "hi"}')
    assert r.status_code == 400 and "5000 digits" in message(r)
    r = post(server, path, "[" * 100_000 + "]" * 100_000)
    assert r.status_code == 400 and "nested deeper" in message(r)
    r = post(server, path, '{"text": "hi", "prompt": "hi", "x": ' + "[" * 200 + "]" * 200 + "}")
    assert r.status_code == 400 and "nested deeper" in message(r)


SURROGATE = "\ud800 hi"
BAD_TEXT_BODIES = {
    "/inference/llama3-70b": [{"text": SURROGATE, "return_prompt": True}, {"text": "hi", "stop_sequence": SURROGATE}],
    "/chat/llama3-70b": [{"text": SURROGATE, "return_prompt": True}, {"text": "hi", "stop_sequence": [SURROGATE]}],
    "/v1/completions": [{"prompt": SURROGATE, "echo": True}, {"prompt": ["ok", SURROGATE], "echo": True},
                        {"prompt": "hi", "stop": SURROGATE}, {"prompt": "hi", "model": SURROGATE},
                        {"prompt": "hi", "user": SURROGATE}],
    "/v1/chat/completions": [{"messages": [{"role": "user", "content": SURROGATE}]},
                             {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
                             {"messages": [{"role": "user", "content": "hi"}], "stop": [SURROGATE]},
                             {"messages": [{"role": SURROGATE, "content": "hi"}]}],
    "/tokenize": [{"prompt": SURROGATE}, {"messages": [{"role": "user", "content": SURROGATE}]}],
}


@pytest.mark.parametrize("path", sorted(BAD_TEXT_BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_in_any_text_field_is_400(server, path, stream):
    for body in BAD_TEXT_BODIES[path]:
        if stream and path.startswith("/v1/"):
            body = {**body, "stream": True}
        # json.dumps writes the lone surrogate as the escape "\ud800", as an attacker would.
        r = post(server, path, json.dumps(body))
        assert r.status_code == 400, (path, body, r.text)
        assert "surrogate" in message(r)
    assert_healthy(server)


def test_fan_out_is_capped_with_a_400_naming_the_limit(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 9, "max_tokens": 1},
                   headers=server.headers, timeout=30)
    assert r.status_code == 400 and "at most 8" in message(r) and "--max-choices" in message(r)
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 3, "n": 3, "max_tokens": 1},
                   headers=server.headers, timeout=30)
    assert r.status_code == 400 and "3 prompt(s) x n=3 = 9" in message(r)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 2, "n": 2, "max_tokens": 1},
                   headers=server.headers, timeout=30)  # 4: the slots and queue of this server hold that
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_a_fan_out_counts_against_the_queue_as_the_sum_of_its_parts(server):
    # 2 slots + 2 queue places: with one long request running, 4 parts do not fit, 3 do.
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"prompt": "hold", "max_tokens": 200, "ignore_eos": True, "stream": True}) as held:
        lines = held.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 4, "max_tokens": 1},
                       headers=server.headers, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "4 completions do not fit" in message(r)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 3, "max_tokens": 1},
                       headers=server.headers, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


@pytest.mark.parametrize("path,field", [("/v1/completions", "stop"), ("/inference/llama3-70b", "stop_sequence")])
def test_stop_strings_are_capped(server, path, field):
    base = {"prompt": "hi", "text": "hi", "max_tokens": 2}
    r = httpx.post(server.url + path, json={**base, field: [f"s{i}" for i in range(65)]}, headers=server.headers)
    assert r.status_code == 400 and "65 stop strings" in message(r) and "at most 64" in message(r)
    r = httpx.post(server.url + path, json={**base, field: ["x" * 257]}, headers=server.headers)
    assert r.status_code == 400 and "257 characters" in message(r)
    r = httpx.post(server.url + path, json={**base, field: [f"s{i}" for i in range(64)]}, headers=server.headers)
    assert r.status_code == 200


def test_stop_token_ids_are_capped(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "stop_token_ids": list(range(257))},
                   headers=server.headers)
    assert r.status_code == 400 and "at most 256" in message(r)


def hold(server, body: dict) -> socket.socket:
    """Sends a request and leaves its answer unread: it holds its place until closed."""
    data = json.dumps(body).encode()
    auth = "".join(f"{k}: {v}\r\n" for k, v in server.headers.items())
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_overloaded_original_route_says_when_to_retry(server):
    holders = [hold(server, {"prompt": "hold", "max_tokens": 200, "ignore_eos": True, "stream": True})
               for _ in range(4)]
    try:
        wait_for(lambda: (lambda s: (s["num_running"], s["num_waiting"]) == (2, 2))(server.status()), what="full")
        r = httpx.post(server.url + "/inference/llama3-70b", json={"text": "one more"}, headers=server.headers,
                       timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        for h in holders:
            h.close()
    wait_for(lambda: server.status()["in_flight"] == 0, what="holders aborted")


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        data += b"<still open>"
    return data


def test_slow_headers_are_cut_off(server):
    """Slowloris: a connection that does not finish its headers in --header-timeout is closed
    with a 408; one that sends nothing at all too."""
    slow = socket.create_connection(("127.0.0.1", server.port))
    silent = socket.create_connection(("127.0.0.1", server.port))
    start = time.monotonic()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.5)
    slow.sendall(b"X-Slow: 1\r\n")  # data keeps coming, but the headers never end
    answer = _read_all(slow, 10)
    assert answer.startswith(b"HTTP/1.1 408") and b"<still open>" not in answer
    assert time.monotonic() - start < 5
    assert _read_all(silent, 10).startswith(b"HTTP/1.1 408")
    slow.close()
    silent.close()
    # A keep-alive connection gets the same deadline for its next request.
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        assert client.get("/health").status_code == 200
        time.sleep(1.5)
        assert client.get("/health").status_code == 200
    assert_healthy(server)


def test_open_connections_are_capped(server):
    socks = []
    try:
        for _ in range(20):
            socks.append(socket.create_connection(("127.0.0.1", server.port)))
        answers = [_read_all(s, 0.3) for s in socks]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) >= 20 - 12 and b"Retry-After: 1" in refused[0]
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert_healthy(server)
