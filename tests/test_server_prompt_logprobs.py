"""Prompt logprobs: /v1/completions with `echo` + `logprobs` (what lm-eval's `local-completions`
sends for loglikelihood), checked against an independent computation: Hugging Face
transformers' log_softmax over the same weights (server), or the model called directly (engine)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf
from engine_util import ByteTokenizer, make_engine, tiny_model
from llamaserve.engine.request import InvalidRequest, SamplingParams
from server_fixtures import start_server

TOL = 1e-4
CHUNK = 8  # prefill chunk: the prompts below span several, so chunked scoring is what is tested


# ---- the engine ---------------------------------------------------------------------------


def run_all(engine) -> list:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_engine_scores_every_prompt_token_across_chunks():
    model = tiny_model()
    engine = make_engine(model, ByteTokenizer(), prefill_chunk=16)
    prompt = list(range(40, 90))  # 50 tokens: 4 chunks
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    engine.add_request("both", prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1, logprobs=0))
    outs = run_all(engine)

    [score] = [o for o in outs if o.request_id == "score"]
    assert score.finished and score.finish_reason == "length" and score.new_token_ids == []
    assert score.completion_tokens == 0 and score.prompt_tokens == 50
    with torch.inference_mode():
        ref = torch.log_softmax(
            model(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]), model.new_cache(1, 64), all_logits=True)[0],
            dim=-1,
        )
    lps = score.prompt_logprobs
    assert len(lps) == 50 and lps[0] is None
    for i in range(1, 50):
        assert lps[i].token_id == prompt[i]
        assert abs(lps[i].logprob - ref[i - 1, prompt[i]].item()) < TOL
        values, ids = ref[i - 1].topk(3)
        assert [t for t, _ in lps[i].top] == ids.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lps[i].top, values.tolist())) < TOL

    both = [o for o in outs if o.request_id == "both"]
    # Sent once, with the first output; then the request decodes as usual.
    assert len(both[0].prompt_logprobs) == 50 and all(o.prompt_logprobs is None for o in both[1:])
    assert sum(len(o.new_token_ids) for o in both) == 3
    assert engine._prompt_logprobs == {}


def test_engine_forgets_scores_of_an_aborted_prompt():
    engine = make_engine(tiny_model(), ByteTokenizer(), prefill_chunk=16)
    engine.add_request("a", list(range(40, 120)), SamplingParams(max_tokens=0, prompt_logprobs=0))
    engine.step()  # one chunk of five scored
    assert engine._prompt_logprobs
    engine.abort("a")
    run_all(engine)
    assert engine._prompt_logprobs == {}


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(InvalidRequest, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21).validate()


# ---- through the server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = tiny_args("llama3")  # the Llama 3 vocabulary, so the real tokenizer's ids fit
    return write_hf(tmp_path_factory.mktemp("plp") / "hf", args, random_weights(args, seed=5, std=0.5))


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_dir):
    srv = start_server(tmp_path_factory.mktemp("plp_srv"), "--weights", str(hf_dir), "--max-seq-len", "128",
                       "--max-users", "4", "--prefill-chunk", str(CHUNK))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=server.headers["Authorization"][7:], max_retries=0,
                      timeout=60)
    c.model_id = c.models.list().data[0].id
    return c


@pytest.fixture(scope="module")
def hf_logprobs(hf_dir):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def lm_eval_parse(choice: dict, ctxlen: int, trailing: int) -> tuple[float, bool]:
    """What lm-eval's local-completions does with a loglikelihood answer (it drops the one
    generated token with [ctxlen:-1]; older versions asked for max_tokens 0 and kept all)."""
    end = len(choice["logprobs"]["token_logprobs"]) - trailing
    values = choice["logprobs"]["token_logprobs"][ctxlen:end]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
    return sum(values), all(v == max(top.values()) for v, top in zip(values, tops))


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_loglikelihood_request_matches_transformers(client, hf_logprobs, max_tokens):
    context = list(range(1000, 1019))  # 19 tokens: the continuation starts inside the third chunk
    ref_context = hf_logprobs(context)
    greedy = int(ref_context[-1].argmax())  # a continuation the model would choose itself ...
    other = int(ref_context[-1].argmin())  # ... and one it would not
    prompts = [context + [greedy], context + [other, 7000]]
    # Exactly lm-eval's payload: token ids, a batch of prompts, temperature 0, seed.
    r = client.completions.create(model=client.model_id, prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0, seed=1234).model_dump()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_logprobs(ids)
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]].item()) < TOL, i
            [(token, value)] = lp["top_logprobs"][i].items()
            assert abs(value - ref[i - 1].max().item()) < TOL
        if max_tokens == 0:
            assert choice["text"] == client_decode(client, ids) and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 2 * max_tokens
    assert r["usage"]["prompt_tokens"] == sum(map(len, prompts))

    (ll_greedy, is_greedy), (ll_other, not_greedy) = (
        lm_eval_parse(c, len(context), max_tokens) for c in r["choices"])
    assert is_greedy and not not_greedy
    assert abs(ll_greedy - ref_context[-1, greedy].item()) < TOL
    assert abs(ll_other - (ref_context[-1, other] + hf_logprobs(context + [other])[-1, 7000]).item()) < 2 * TOL


def client_decode(client, ids: list[int]) -> str:
    r = httpx.post(str(client.base_url).replace("/v1/", "/detokenize"), json={"tokens": ids},
                   headers={"Authorization": f"Bearer {client.api_key}"})
    return r.json()["prompt"]


def test_echo_logprobs_of_a_text_prompt_streaming_and_not(client, hf_logprobs):
    text = "Héllo wörld, the café 東京 🎉"
    full = client.completions.create(model=client.model_id, prompt=text, echo=True, logprobs=2, max_tokens=3,
                                     temperature=0)
    choice = full.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(text)
    tokenized = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": text},
                           headers={"Authorization": f"Bearer {client.api_key}"}).json()["tokens"]
    n = len(tokenized)
    assert len(lp.tokens) == n + 3 and lp.tokens[0] == "<|begin_of_text|>"
    ref = hf_logprobs(tokenized)
    assert max(abs(lp.token_logprobs[i] - ref[i - 1, tokenized[i]].item()) for i in range(1, n)) < TOL
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # Offsets index the returned text: the BOS (not in the echoed text) at 0, then each token
    # where its text starts; the completion right after the prompt.
    assert lp.text_offset[0] == lp.text_offset[1] == 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n] == len(text)
    assert choice.text[lp.text_offset[n]:] == "".join(lp.tokens[n:])

    chunks = list(client.completions.create(model=client.model_id, prompt=text, echo=True, logprobs=2, max_tokens=3,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == text and first.logprobs.token_logprobs == lp.token_logprobs[:n]
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens and "".join(c.choices[0].text for c in chunks) == choice.text


def test_echo_without_logprobs_and_max_tokens_zero(client, server):
    r = client.completions.create(model=client.model_id, prompt="Just the prompt", echo=True, max_tokens=0)
    assert r.choices[0].text == "Just the prompt" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=client.model_id, prompt="x", max_tokens=0)  # nothing to return
    assert e.value.body["param"] == "max_tokens"
