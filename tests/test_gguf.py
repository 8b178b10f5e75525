"""llama.cpp GGUF files: random tiny Llama models written with the `gguf` package's writer (F32,
Q8_0, Q4_K; byte-level BPE and sentencepiece vocabularies), loaded from the .gguf, must give
transformers' tokens and greedy ids for transformers loading the same file (`gguf_file=`);
through the converted-weight cache the second start reads no GGUF; a file we cannot serve is
refused with one line saying why."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf
from gguf_util import bpe_vocab, dequantized, gguf_args, spm_vocab, write_gguf
from llamaserve.engine.request import SamplingParams
from llamaserve.llm import LLM
from llamaserve.weights import WeightsError, load_model, open_checkpoint

TEXTS = ["The quick brown fox", "Hello world! 12345 café 東京 🎉", " leading space  two", "Paris is the capital"]
STEPS = 24


def _vocab(kind: str) -> dict:
    return bpe_vocab() if kind == "bpe" else spm_vocab()


def _hf_greedy(hf, ids: list[int], steps: int = STEPS) -> list[int]:
    t = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=steps,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("qtype,kind", [("F32", "spm"), ("Q8_0", "bpe"), ("Q4_K", "spm")])
def test_gguf_matches_transformers_loading_the_same_file(tmp_path, qtype, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = _vocab(kind)
    args = gguf_args(len(vocab["tokens"]), tied=kind == "spm")
    sd = random_weights(args, seed=3, std=0.5)
    path = write_gguf(tmp_path / "m" / "model.gguf", args, sd, qtype, vocab)

    # The weights are the package's dequantization of the file, q/k rows untouched: llama.cpp
    # stores them in Meta's interleaved RoPE layout, which is ours.
    want = dequantized(sd, qtype)
    with open_checkpoint(path, tmp_path / "cache") as reader:
        assert set(reader.shapes()) == set(sd)
        for name in sd:
            assert torch.equal(reader.read(name), want[name]), name

    llm = LLM(str(path), max_users=2, max_seq_len=256, progress=False, cache_root=tmp_path / "cache")

    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = llm.tokenizer.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert llm.tokenizer.decode(ids) == hf_tok.decode(ids), text
    assert llm.tokenizer.bos_id == hf_tok.bos_token_id and llm.tokenizer.eos_id == hf_tok.eos_token_id

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    outs = llm.generate(TEXTS, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    for out in outs:
        assert out.token_ids == _hf_greedy(hf, out.prompt_token_ids)
    llm.close()


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_encodable_tensor_type_reads_back_as_the_package_decodes_it(tmp_path, qtype):
    vocab = spm_vocab()
    args = gguf_args(len(vocab["tokens"]), n_layers=1)
    sd = random_weights(args, seed=9, std=0.5)
    path = write_gguf(tmp_path / f"{qtype}.gguf", args, sd, qtype, vocab)
    want = dequantized(sd, qtype)
    with open_checkpoint(path, tmp_path / "cache") as reader:
        for name in sd:
            assert torch.equal(reader.read(name), want[name]), name
        # and in bf16, as `--dtype bfloat16` loads it
        assert torch.equal(reader.read("layers.0.attention.wq.weight", torch.bfloat16),
                           want["layers.0.attention.wq.weight"].bfloat16())


def test_second_start_reads_the_cache_not_the_gguf(tmp_path, caplog):
    vocab = bpe_vocab()
    args = gguf_args(len(vocab["tokens"]))
    path = write_gguf(tmp_path / "dir" / "tiny-chat.Q8_0.gguf", args, random_weights(args, seed=4), "Q8_0", vocab)
    cache = tmp_path / "cache"
    first = load_model(path.parent, cache_root=cache, progress=False)  # a directory holding one .gguf
    assert first.format == "gguf" and first.name == "dir"
    side = first.tokenizer_dir
    assert side.parent == cache / "llamaserve_gguf"
    config = json.loads((side / "tokenizer_config.json").read_text())
    assert config["chat_template"] == vocab["chat_template"] and config["eos_token"] == "<|im_end|>"

    from llamaserve.weights import gguf as gguf_mod

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was opened on a cache hit")

    caplog.set_level(logging.INFO, logger="llamaserve.weights.cache")
    original = gguf_mod.GGUFFile
    gguf_mod.GGUFFile = no_gguf
    try:
        second = load_model(path.parent, cache_root=cache, progress=False)
    finally:
        gguf_mod.GGUFFile = original
    assert "weight cache hit" in caplog.text
    assert second.tokenizer_dir == side and second.format == "gguf"
    for name, t in first.model.state_dict().items():
        assert torch.equal(t, second.model.state_dict()[name]), name

    # Changed file: stale entry and config rebuilt from the new metadata.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = load_model(path.parent, cache_root=cache, progress=False)
    assert third.tokenizer_dir != side and (third.tokenizer_dir / "tokenizer.json").is_file()


def test_llama31_rope_freqs_become_scaled_rope(tmp_path):
    from llamaserve.weights.gguf_file import llama3_rope_factors

    vocab = spm_vocab()
    base = tiny_args("llama31", small_vocab=True)
    args = gguf_args(len(vocab["tokens"]), use_scaled_rope=True, rope_scale_factor=base.rope_scale_factor,
                     rope_original_max_positions=base.rope_original_max_positions)
    sd = random_weights(args, seed=6, std=0.5)
    scaling = args.to_hf_config()["rope_scaling"]
    freqs = llama3_rope_factors(args.rope_theta, args.head_dim, scaling)
    orig = lambda w: w.add_uint32("llama.rope.scaling.original_context_length", args.rope_original_max_positions)  # noqa: E731
    path = write_gguf(tmp_path / "m.gguf", args, sd, "F32", vocab, extra=orig, rope_freqs=freqs)
    loaded = load_model(path, progress=False, cache_root=tmp_path / "c")
    assert loaded.args == args.replace(max_positions=2048)  # llama.context_length, as write_gguf writes it
    # Same answers as the same weights from a Hugging Face directory stating the scaling.
    hf_dir = write_hf(tmp_path / "hf", args, sd)
    prompt = list(range(3, 40))
    a = LLM(loaded.model, tokenizer=loaded.tokenizer_dir, max_users=1, max_seq_len=256)
    b = LLM(str(hf_dir), tokenizer=loaded.tokenizer_dir, max_users=1, max_seq_len=256, progress=False)
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert a.generate([prompt], p)[0].token_ids == b.generate([prompt], p)[0].token_ids

    bad = write_gguf(tmp_path / "bad.gguf", args, sd, "F32", vocab, rope_freqs=freqs * 1.5)
    with pytest.raises(WeightsError, match="rope_freqs.weight is not Llama 3's scaled RoPE"):
        load_model(bad, progress=False, cache_root=tmp_path / "c")


def _raw_iq4_nl(w):
    import gguf

    w.add_tensor("blk.0.attn_extra.weight", np.zeros((4, 256 // 32 * 18), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)


@pytest.mark.parametrize("case,message", [
    ("arch", r"GGUF architecture 'qwen2' is not supported \(only 'llama'\)"),
    ("type", r"tensor blk\.0\.attn_extra\.weight has type IQ4_NL, which is not supported"),
    ("pre", r"tokenizer\.ggml\.pre 'mystery' is not supported"),
    ("truncated", r"cannot read the file; it is truncated or not a GGUF file"),
    ("two", r"holds 2 \.gguf files \(a\.gguf, b\.gguf\); pass the one to load"),
])
def test_unservable_gguf_is_refused_with_one_line(tmp_path, case, message):
    vocab = bpe_vocab()
    args = gguf_args(len(vocab["tokens"]), n_layers=1)
    sd = random_weights(args, seed=1)
    target = tmp_path / "m.gguf"
    if case == "arch":
        write_gguf(target, args, sd, "F32", vocab, arch="qwen2")
    elif case == "type":
        write_gguf(target, args, sd, "Q8_0", vocab, extra=_raw_iq4_nl)
    elif case == "pre":
        write_gguf(target, args, sd, "F32", dict(vocab, pre="mystery"))
    elif case == "truncated":
        write_gguf(target, args, sd, "F32", vocab)
        target.write_bytes(target.read_bytes()[:5000])
    else:
        target = tmp_path / "two"
        for name in ("a.gguf", "b.gguf"):
            write_gguf(target / name, args, sd, "F32", vocab)
    with pytest.raises(WeightsError, match=message) as e:
        load_model(target, progress=False, cache_root=tmp_path / "c")
    assert "\n" not in str(e.value)

    if case == "arch":  # and the CLI says it in one line, no traceback
        run = subprocess.run([sys.executable, "-m", "llamaserve", "generate", "--model", str(target), "--prompt", "x"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "Traceback" not in run.stderr
        assert "GGUF architecture 'qwen2' is not supported" in run.stderr


@pytest.mark.slow
def test_served_gguf_answers_like_transformers(tmp_path):
    import httpx
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server_fixtures import start_server

    vocab = bpe_vocab()
    args = gguf_args(len(vocab["tokens"]))
    path = write_gguf(tmp_path / "m" / "tiny-chat.Q4_K.gguf", args, random_weights(args, seed=8, std=0.5), "Q4_K", vocab)
    server = start_server(tmp_path, "--weights", str(path), "--max-seq-len", "256", "--max-users", "2",
                          env={"CACHE_ROOT": str(tmp_path / "cache")})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.headers["Authorization"][7:],
                               max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "tiny-chat.Q4_K"
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        for text in TEXTS[:2]:
            ids = hf_tok.encode(text, add_special_tokens=False)
            r = client.completions.create(model="tiny-chat.Q4_K", prompt=ids, max_tokens=16, temperature=0)
            assert r.choices[0].text == hf_tok.decode(_hf_greedy(hf, ids, 16))
        info = httpx.get(f"{server.url}/tokenizer_info", headers=server.headers, timeout=10).json()
        assert (info["bos_token"], info["eos_token"]) == ("<|endoftext|>", "<|im_end|>")
        assert info["chat_template"] == vocab["chat_template"]

        # Chat: the file's own (ChatML) template, ids exactly as transformers renders them.
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
        out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        prompt = list(out["input_ids"] if hasattr(out, "keys") else out)
        r = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=server.headers, timeout=10)
        assert r.json()["tokens"] == prompt
        reply = client.chat.completions.create(model="tiny-chat.Q4_K", messages=messages, max_tokens=12,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.choices[0].message.content == hf_tok.decode(_hf_greedy(hf, prompt, 12))
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
def test_loading_a_gguf_takes_about_the_dequantized_models_memory(tmp_path):
    from test_weights_memory import CHILD, LIMIT

    vocab = spm_vocab()
    args = gguf_args(len(vocab["tokens"]), dim=1024, n_layers=6, n_heads=8, n_kv_heads=2, explicit_hidden_dim=2816)
    sd = random_weights(args, seed=0)
    files = [write_gguf(tmp_path / f"{q}.gguf", args, sd, q, vocab) for q in ("Q8_0", "Q4_K")]
    del sd
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}  # the config/tokenizer directory
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, files)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert r["size"] > 250e6
        used = r["peak"] - r["base"]
        print(f"{r['dir']}: peak {used / 1e6:.0f} MB for a {r['size'] / 1e6:.0f} MB model ({used / r['size']:.2f}x)")
        assert used < LIMIT * r["size"], f"{r['dir']}: {used / r['size']:.2f}x the dequantized model's size"
