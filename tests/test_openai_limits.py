"""OpenAI-exact limits on the OpenAI routes (policy: server/openai_limits.py): a prompt plus an
explicit max_tokens beyond the context is a 400 in OpenAI's and vLLM's words unless the request
asks for capping, and parameters we do not implement are refused by name, not ignored."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

pytest_plugins = ["server_fixtures"]  # the session-wide `api_server` (mock model, context 256)

CONTEXT = 256
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(api_server):
    token = api_server.headers["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=token, max_retries=0, timeout=60)


def _post(api_server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{api_server.url}/v1/{route}", json=body, headers=api_server.headers, timeout=60)


def test_chat_max_tokens_beyond_the_context_is_400_in_openai_words(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=100000)
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "max_tokens"
    m = re.match(r"This model's maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                 r"\((\d+) in the messages, (\d+) in the completion\)\. Please reduce the length of the messages "
                 r"or completion", err.body["message"])
    assert m, err.body["message"]
    limit, total, prompt, completion = map(int, m.groups())
    assert (limit, completion) == (CONTEXT, 100000) and total == prompt + completion and 0 < prompt < CONTEXT
    assert '"cap_max_tokens": true' in err.body["message"]  # and how to opt into capping


def test_completion_max_tokens_beyond_the_context_is_400(api_server):
    r = _post(api_server, "completions", {"prompt": "one two three", "max_tokens": CONTEXT})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    assert re.search(rf"you requested (\d+) tokens \(\d+ in the prompt, {CONTEXT} in the completion\)", err["message"])
    # Exactly at the context: accepted.
    prompt_len = len(_post(api_server, "../tokenize", {"prompt": "one two three"}).json()["tokens"])
    ok = _post(api_server, "completions", {"prompt": "one two three", "max_tokens": CONTEXT - prompt_len,
                                            "ignore_eos": True})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("route, body", [
    ("chat/completions", {"messages": MESSAGES}),
    ("completions", {"prompt": "one two three"}),
])
def test_capping_when_the_request_opts_in(api_server, route, body):
    r = _post(api_server, route, {**body, "max_tokens": 100000, "cap_max_tokens": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT and choice["finish_reason"] == "length"
    bad = _post(api_server, route, {**body, "cap_max_tokens": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cap_max_tokens"


def test_chat_without_max_tokens_still_gets_the_rest_of_the_context(api_server):
    r = _post(api_server, "chat/completions", {"messages": MESSAGES, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == CONTEXT


@pytest.mark.parametrize("param, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("logit_bias", {"50": 100}),
    ("response_format", {"type": "json_object"}),
])
def test_unimplemented_parameters_are_400_naming_them(client, param, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
                                       **{param: value})
    err = info.value
    assert err.param == param and err.code == "unsupported_parameter"
    assert err.body["message"].startswith(f"Unsupported parameter: '{param}'")
    if param == "response_format":
        assert "'json_object'" in err.body["message"]


def test_completions_refuse_logit_bias_and_suffix(api_server):
    for param, value in (("logit_bias", {"7": -100}), ("suffix", "the end")):
        r = _post(api_server, "completions", {"prompt": "hi", "max_tokens": 2, param: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_parameters_that_ask_for_nothing_are_accepted(client):
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
                                           user="alice", response_format={"type": "text"}, tool_choice="none")
    assert reply.choices[0].message.content is not None
