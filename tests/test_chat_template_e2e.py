"""End to end with a Llama-architecture model that is not Meta's: byte-level BPE tokenizer (GPT-2
style), tied embeddings, a ChatML template, a 320-token vocabulary (the tokenizer has 310).
`generate --chat`, `LLM.generate(chat=True)`, `/v1/chat/completions` through the official `openai`
client and the original `/chat/...` route send exactly the ids transformers.apply_chat_template
produces, and the greedy answer equals transformers' on the same weights."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from engine_util import one_thread
from hf_models import hf_greedy, save_transformers_model, small, write_tokenizer_dir
from server_fixtures import start_server

from llamaserve.cli import main
from llamaserve.engine.request import SamplingParams
from llamaserve.llm import LLM
from llamaserve.tokenizer import load_tokenizer

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
STEPS = 24
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("chatml")
    tok_dir = write_tokenizer_dir(root / "tok")
    config = LlamaConfig(**small(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100.0}))
    directory = save_transformers_model(root / "model", config, seed=11, tokenizer_dir=tok_dir)
    assert "lm_head.weight" not in json.dumps(json.loads((directory / "config.json").read_text()))
    return directory


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' prompt ids for MESSAGES and its greedy continuation."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    out = hf_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    prompt = list(out["input_ids"] if hasattr(out, "keys") else out)
    return prompt, hf_greedy(model_dir, prompt, STEPS)


def _until_stop(ids, stop_ids):
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k], True
    return ids, False


def test_generate_chat_sends_transformers_ids_and_answers_like_it(capsys, model_dir, reference):
    prompt, greedy = reference
    code = main(["generate", "--model", str(model_dir), "--chat", "--system", MESSAGES[0]["content"],
                 "--prompt", MESSAGES[1]["content"], "--max-tokens", str(STEPS), "--ignore-eos", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_token_ids"] == prompt
    assert data["token_ids"] == greedy


def test_llm_generate_chat(model_dir, reference):
    prompt, greedy = reference
    with LLM(str(model_dir), max_users=2, max_seq_len=256, progress=False) as llm:
        out = llm.generate([MESSAGES], SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True), chat=True)[0]
    assert out.prompt_token_ids == prompt and out.token_ids == greedy


@pytest.mark.slow
def test_server_chat_routes_send_transformers_ids(tmp_path, model_dir, reference):
    prompt, greedy = reference
    tok = load_tokenizer(model_dir)
    tok.cover_vocab(320)  # the model's padded vocabulary
    expected, stopped = _until_stop(greedy, tok.stop_token_ids)
    server = start_server(tmp_path, "--model", str(model_dir), "--max-users", "2", "--max-seq-len", "256")
    try:
        r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == prompt
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.headers["Authorization"].split()[1],
                               max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=resp_model(client), messages=MESSAGES,
                                              max_tokens=STEPS, temperature=0)
        assert resp.usage.prompt_tokens == len(prompt)
        assert resp.choices[0].message.content == tok.decode(expected)
        assert resp.choices[0].finish_reason == ("stop" if stopped else "length")
        resp = client.chat.completions.create(model=resp_model(client), messages=MESSAGES, max_tokens=STEPS,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert resp.choices[0].message.content == tok.decode(greedy)
        # The original route: one user turn, rendered by the same template.
        user_only = [MESSAGES[1]]
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(user_only, tokenize=True,
                                                                           add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        want = tok.decode(hf_greedy(model_dir, ids, 8))
        with httpx.stream("POST", server.url + "/chat/llama3-70b", headers=server.headers, timeout=60,
                          json={"text": user_only[0]["content"], "max_tokens": 8, "top_k": 1,
                                "ignore_eos": True}) as r:
            assert r.status_code == 200, r.read()
            events = [e for e in r.read().decode().split("\n\n") if e.startswith("event: answer")]
        assert json.loads(events[-1].split("data: ", 1)[1])["message"] == want
    finally:
        server.stop()


def resp_model(client) -> str:
    return client.models.list().data[0].id


def test_chat_template_file_overrides_the_checkpoint_one(tmp_path, capsys, model_dir):
    from transformers import AutoTokenizer

    other = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}<|endoftext|>{% endfor %}[ASSISTANT]"
    (tmp_path / "other.jinja").write_text(other)
    code = main(["generate", "--model", str(model_dir), "--chat", "--system", MESSAGES[0]["content"],
                 "--prompt", MESSAGES[1]["content"], "--max-tokens", "2", "--json",
                 "--chat-template", str(tmp_path / "other.jinja")])
    out, err = capsys.readouterr()
    assert code == 0, err
    want = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(MESSAGES, chat_template=other, tokenize=True)
    assert json.loads(out)["prompt_token_ids"] == list(want["input_ids"] if hasattr(want, "keys") else want)


def test_serve_refuses_a_bad_chat_template_at_start(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.jinja").write_text("{{ cycler.__init__.__globals__ }}")
    proc = subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--mock", "--no-auth", "--port", "0",
                           "--chat-template", str(tmp_path / "bad.jinja")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--chat-template" in proc.stderr and "refused by the sandbox" in proc.stderr and "__init__" in proc.stderr
