"""The OpenAI API through the official `openai` client against a real server on loopback."""

from __future__ import annotations

import httpx
import openai
import pytest



pytest_plugins = ["server_fixtures"]  # the session-wide `api_server`


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server):
    token = server.headers["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=30)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.status()["model"]]


def test_chat_non_streaming_with_usage(client):
    r = client.chat.completions.create(model="llamaserve-mock", messages=MESSAGES, max_tokens=5)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_streaming_matches_non_streaming_and_reports_usage(client):
    # Seeded: OpenAI's default temperature is 1, and only a seed makes two sampled runs comparable.
    full = client.chat.completions.create(messages=MESSAGES, model="llamaserve-mock", max_tokens=20, seed=11)
    stream = client.chat.completions.create(messages=MESSAGES, model="llamaserve-mock", max_tokens=20, seed=11,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == full.choices[0].message.content
    # The mock ends every turn with <|eot_id|> at its 10th token: a real stop, before max_tokens.
    assert finish == "stop" == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens == 10


def test_completions_stream_and_not(client):
    # Seeded: OpenAI's default temperature is 1, and only a seed makes two sampled runs comparable.
    full = client.completions.create(model="llamaserve-mock", prompt="Once upon a time", max_tokens=6, seed=11)
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    parts = [c.choices[0].text for c in client.completions.create(
        model="llamaserve-mock", prompt="Once upon a time", max_tokens=6, seed=11, stream=True) if c.choices]
    assert "".join(parts) == full.choices[0].text and len(parts) >= 3
    echoed = client.completions.create(model="llamaserve-mock", prompt="Once upon a time", max_tokens=6, seed=11,
                                       echo=True)
    assert echoed.choices[0].text == "Once upon a time" + full.choices[0].text


def test_n_greater_than_one_and_prompt_lists(client):
    r = client.completions.create(model="llamaserve-mock", prompt=["Alpha", "Beta"], max_tokens=4, n=2,
                                  temperature=2.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    # Choices of one prompt are separate samples; a prompt's choice does not leak into another's.
    assert r.choices[0].text != r.choices[1].text
    chat = client.chat.completions.create(model="llamaserve-mock", messages=MESSAGES, max_tokens=3, n=3)
    assert len(chat.choices) == 3 and chat.usage.completion_tokens == 9


def test_stop_string_and_list(client):
    full = client.completions.create(model="llamaserve-mock", prompt="Stop test", max_tokens=9).choices[0].text
    stop = full[4:9]
    cut = client.completions.create(model="llamaserve-mock", prompt="Stop test", max_tokens=9, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    cut2 = client.completions.create(model="llamaserve-mock", prompt="Stop test", max_tokens=9,
                                     stop=["zzzz-never", stop])
    assert cut2.choices[0].text == cut.choices[0].text


def test_seed_gives_identical_text(client):
    def sample(seed):
        return client.completions.create(model="llamaserve-mock", prompt="Random", max_tokens=8,
                                         temperature=2.0, seed=seed).choices[0].text

    a, b, c = sample(11), sample(11), sample(12)
    assert a == b
    assert a != c  # the seed matters, so the equality above is not a greedy accident


def test_logprobs(client):
    r = client.completions.create(model="llamaserve-mock", prompt="Logprobs", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 == len(lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="llamaserve-mock", messages=MESSAGES, max_tokens=3,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


def test_invalid_values_give_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llamaserve-mock", prompt="x", temperature=3.0)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llamaserve-mock", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llamaserve-mock", prompt="word " * 300, max_tokens=2)
    assert "256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llamaserve-mock", max_tokens=2, messages=[{"role": "tool", "content": "x"}])
    assert "role" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 70000}, headers=server.headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{oops", headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Unknown fields are ignored, as OpenAI-compatible servers do.
    r = httpx.post(server.url + "/v1/completions", headers=server.headers,
                   json={"prompt": "x", "max_tokens": 2, "some_future_field": {"a": 1}, "user": "me"})
    assert r.status_code == 200


def test_tokenize_detokenize_roundtrip(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=server.headers)
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) == 3 and ids[0] == 128000
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids[1:]}, headers=server.headers)
    assert r.json()["prompt"] == "Hello world"
    r = httpx.post(server.url + "/detokenize", json={"tokens": [-1]}, headers=server.headers)
    assert r.status_code == 400


def test_every_listed_sampling_parameter_is_accepted(client):
    r = client.chat.completions.create(
        model="llamaserve-mock", messages=MESSAGES, max_completion_tokens=15, temperature=0.7, top_p=0.9, seed=1,
        presence_penalty=0.5, frequency_penalty=0.5, stop=["never-seen"],
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    # ignore_eos: the mock's end-of-turn at its 10th token does not stop it
    assert r.usage.completion_tokens == 15 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="llamaserve-mock", prompt="x", max_tokens=15)
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llamaserve-mock", prompt="x", extra_body={"min_p": 2})
    assert e.value.body["param"] == "min_p"
