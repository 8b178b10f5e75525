"""lm-eval out of the box: `lm_eval --model local-completions` with `tokenizer_backend=remote`
against a real server (auth on), on tiny local tasks, with no Hugging Face download.

The multiple-choice scores lm-eval reports are checked against transformers' log-probabilities
over the same weights, and the generations against transformers' greedy continuation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf
from llamaserve.tokenizer import load_tokenizer
from server_fixtures import start_server

MC_DOCS = [
    {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How much is 2 + 2?", "choices": ["4", "5"], "answer": 0},
    {"question": "Which is the capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": 1},
]
GEN_DOCS = [{"question": "Say hi", "answer": "hi"}, {"question": "Count to two", "answer": "1 2"}]
MAX_GEN = 6


def _write_tasks(root: Path) -> Path:
    """Two task YAMLs over local jsonl files (the `json` builder ships with `datasets`)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: llamaserve_tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (root / "gen.yaml").write_text(
        f"task: llamaserve_tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = tiny_args("llama3")  # the Llama 3 vocabulary: the built-in tokenizer's ids fit
    return write_hf(tmp_path_factory.mktemp("lme") / "tiny", args, random_weights(args, seed=11, std=0.5))


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_dir):
    srv = start_server(tmp_path_factory.mktemp("lme_srv"), "--weights", str(hf_dir), "--max-seq-len", "256",
                       "--max-users", "4")
    yield srv
    srv.stop()


def test_tokenizer_info_needs_auth_and_names_the_special_tokens(server):
    assert httpx.get(f"{server.url}/tokenizer_info", timeout=10).status_code == 401
    info = httpx.get(f"{server.url}/tokenizer_info", headers=server.headers, timeout=10).json()
    tok = load_tokenizer(None)  # the checkpoint has no tokenizer: the built-in Llama 3 one
    assert info["bos_token"] == "<|begin_of_text|>" and info["bos_token_id"] == tok.bos_id
    assert info["eos_token"] == "<|end_of_text|>" and info["eos_token_id"] == tok.eos_id
    assert info["stop_token_ids"] == sorted(tok.stop_token_ids) and info["model_max_length"] == 256
    # lm-eval learns the ids by tokenizing the names; text around a special token stays text.
    for name, want in ((info["bos_token"], [tok.bos_id]), (info["eos_token"], [tok.eos_id]),
                       ("x<|end_of_text|>", tok.encode("x<|end_of_text|>"))):
        r = httpx.post(f"{server.url}/tokenize", json={"prompt": name, "add_special_tokens": False},
                       headers=server.headers, timeout=10)
        assert r.json()["tokens"] == want


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def _loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = context_ids + continuation_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logp[len(context_ids) + i - 1, t].item() for i, t in enumerate(continuation_ids))


def _greedy_text(model, tok, ids: list[int]) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return tok.decode(out[0, len(ids):].tolist()).split("\n")[0]


@pytest.mark.slow
def test_lm_eval_runs_multiple_choice_and_generation_with_the_remote_tokenizer(server, tmp_path, hf_model):
    tasks = _write_tasks(tmp_path / "tasks")
    token = server.headers["Authorization"].removeprefix("Bearer ")
    name = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=10).json()["data"][0]["id"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "OPENAI_API_KEY": token}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={name},base_url={server.url}/v1/completions,tokenizer_backend=remote,auth_token={token},"
           "max_length=256",
           "--tasks", "llamaserve_tiny_mc,llamaserve_tiny_gen", "--include_path", str(tasks),
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {
        task: [json.loads(line) for f in (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
               for line in f.read_text().splitlines()]
        for task in ("llamaserve_tiny_mc", "llamaserve_tiny_gen")
    }
    tok = load_tokenizer(None)

    # Multiple choice: every choice's log-likelihood is transformers' over lm-eval's own split
    # of the text into context and continuation tokens (no BOS, as lm-eval sends it).
    correct = 0
    for sample in sorted(samples["llamaserve_tiny_mc"], key=lambda s: s["doc_id"]):
        doc = MC_DOCS[sample["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice, resp in zip(doc["choices"], sample["filtered_resps"]):
            whole, ctx = tok.encode(context + " " + choice), tok.encode(context)
            want = _loglikelihood(hf_model, ctx, whole[len(ctx):])
            assert abs(float(resp[0]) - want) < 1e-3, (doc, choice, resp, want)
            scores.append(want)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert results["llamaserve_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))

    # Generation: lm-eval's answer is transformers' greedy continuation, cut at its stop string.
    matches = 0
    for sample in samples["llamaserve_tiny_gen"]:
        doc = GEN_DOCS[sample["doc_id"]]
        want = _greedy_text(hf_model, tok, tok.encode(f"Q: {doc['question']}\nA:"))
        assert sample["filtered_resps"][0] == want
        matches += want == doc["answer"]  # lm-eval's exact_match compares the strings as they are
    assert results["llamaserve_tiny_gen"]["exact_match,none"] == pytest.approx(matches / len(GEN_DOCS))
