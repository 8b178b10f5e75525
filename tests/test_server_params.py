"""Sampling parameters sent over HTTP reach the sampler: each one changes the output, and the
output is exactly what the offline API (`LLM` + `SamplingParams`) gives for the same request."""

from __future__ import annotations

import dataclasses
import functools

import openai
import pytest

from checkpoints import random_weights, tiny_args, write_hf
from llamaserve.engine.request import SamplingParams
from server_fixtures import start_server

pytestmark = pytest.mark.slow
BASE = dict(temperature=1.0, seed=11, max_tokens=24)
# Penalties act on tokens already seen, and neither a sampled nor a greedy continuation of the
# tiny model repeats one in 24 tokens: negative penalties (allowed, as in OpenAI's API) make
# greedy decoding repeat what it has seen, which shows the parameter arrived.
GREEDY = dict(BASE, temperature=0)
# (the request it changes, one parameter): each strong enough to change 24 tokens of the peaked tiny model.
CASES = {
    "top_k": (BASE, {"top_k": 2}),
    "top_p": (BASE, {"top_p": 0.3}),
    "min_p": (BASE, {"min_p": 0.3}),
    "temperature": (BASE, {"temperature": 0.3}),
    "seed": (BASE, {"seed": 12}),
    "presence_penalty": (GREEDY, {"presence_penalty": -2.0}),
    "frequency_penalty": (GREEDY, {"frequency_penalty": -2.0}),
    "repetition_penalty": (GREEDY, {"repetition_penalty": 0.5}),
}
PROMPT = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]  # ids: no tokenizer in between
SERVER_ARGS = ("--max-seq-len", "128", "--max-users", "4")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = tiny_args("llama3")  # the Llama 3 vocabulary, so the real tokenizer's ids fit
    return write_hf(tmp_path_factory.mktemp("params") / "hf", args, random_weights(args, seed=7, std=0.5))


@pytest.fixture(scope="module")
def client(tmp_path_factory, hf_dir):
    srv = start_server(tmp_path_factory.mktemp("params_srv"), "--weights", str(hf_dir), *SERVER_ARGS)
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.headers["Authorization"][7:], max_retries=0, timeout=60)
    c.model_id = c.models.list().data[0].id
    yield c
    srv.stop()


@pytest.fixture(scope="module")
def offline(hf_dir):
    from llamaserve.llm import LLM

    llm = LLM(str(hf_dir), max_seq_len=128, max_users=4, progress=False)

    @functools.cache
    def generate(**params) -> str:
        return llm.generate_ids([PROMPT], SamplingParams(ignore_eos=True, **params))[0].text

    return generate


def over_http(client, **params) -> str:
    openai_fields = {f.name for f in dataclasses.fields(SamplingParams)} & {
        "max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"}
    extra = {k: v for k, v in params.items() if k not in openai_fields}  # top_k, min_p, repetition_penalty
    known = {k: v for k, v in params.items() if k in openai_fields}
    r = client.completions.create(model=client.model_id, prompt=PROMPT, extra_body={"ignore_eos": True, **extra},
                                  **known)
    assert r.usage.completion_tokens == params["max_tokens"]
    return r.choices[0].text


@pytest.mark.parametrize("base", [BASE, GREEDY], ids=["sampled", "greedy"])
def test_baseline_over_http_equals_offline(client, offline, base):
    assert over_http(client, **base) == offline(**base)


@pytest.mark.parametrize("case", CASES)
def test_each_parameter_changes_the_output_exactly_as_offline(client, offline, case):
    base, change = CASES[case]
    params = {**base, **change}
    got = over_http(client, **params)
    assert got == offline(**params)
    assert got != offline(**base), f"{case} did not change the output"
