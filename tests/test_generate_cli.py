"""`llamaserve generate`: the real command, as a subprocess on the built-in model and in-process
on a tiny Hugging Face checkpoint."""

import json
import os
import subprocess
import sys

import pytest
from checkpoints import random_weights, tiny_args, write_hf
from engine_util import one_thread

from llamaserve.cli import main
from llamaserve.engine.request import SamplingParams
from llamaserve.llm import LLM
from llamaserve.tokenizer import load_tokenizer

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = tiny_args("llama3")
    return write_hf(tmp_path_factory.mktemp("gen") / "hf", args, random_weights(args, seed=3, std=0.2))


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_generate_json_on_the_builtin_model_as_a_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llamaserve", "generate", "--prompt", "Hello, world", "--max-tokens", "6",
         "--ignore-eos", "--json"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gibberish" in proc.stderr  # the built-in random model is announced
    data = json.loads(proc.stdout)
    tok = load_tokenizer(None)
    assert data["prompt_token_ids"] == tok.encode("Hello, world", bos=True)
    assert len(data["token_ids"]) == 6 and data["finish_reason"] == "length"
    assert data["text"] == tok.decode(data["token_ids"])
    assert data["usage"] == {"prompt_tokens": len(data["prompt_token_ids"]), "completion_tokens": 6,
                             "total_tokens": len(data["prompt_token_ids"]) + 6}


def test_text_output_streams_the_same_tokens_as_json(capsys, hf_dir):
    common = ["--model", str(hf_dir), "--prompt", "Once upon a time", "--max-tokens", "12", "--ignore-eos"]
    code, out, _ = run_cli(capsys, *common, "--json")
    assert code == 0
    data = json.loads(out)
    code, text_out, err = run_cli(capsys, *common)
    assert code == 0
    assert text_out == data["text"] + "\n"
    assert "length: " in err and "12 generated" in err
    # The command is the engine: same ids as the Python API.
    llm = LLM(str(hf_dir), max_users=1, max_seq_len=4096, progress=False)
    ref = llm.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert data["token_ids"] == ref.token_ids and data["prompt_token_ids"] == ref.prompt_token_ids


def test_chat_system_and_seeded_sampling(capsys, hf_dir):
    argv = ["--model", str(hf_dir), "--prompt", "Hi!", "--system", "Be brief.", "--max-tokens", "8",
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    a = json.loads(out)
    tok = load_tokenizer(None)
    assert a["prompt_token_ids"] == tok.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    )
    b = json.loads(run_cli(capsys, *argv)[1])
    assert a["token_ids"] == b["token_ids"]  # the seed makes it reproducible
    c = json.loads(run_cli(capsys, *argv[:-3], "--seed", "8", "--json")[1])
    assert c["token_ids"] != a["token_ids"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/dir"], "/no/such/dir"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--max-seq-len", "0"], "--max-seq-len"),
    ],
)
def test_bad_input_gives_one_clear_line(capsys, hf_dir, argv, message):
    base = ["--prompt", "x"] + ([] if "--model" in argv else ["--model", str(hf_dir)])
    code, out, err = run_cli(capsys, *base, *argv)
    assert code == 1 and out == ""
    assert err.startswith("llamaserve generate: error:") and message in err
    assert "Traceback" not in err
