"""`llamaserve demo` and `llamaserve demo-alpaca` end to end through the real CLI entry point."""

import json
import re
import sys
import types

import pytest
from checkpoints import random_weights, tiny_args, write_hf
from engine_util import one_thread

from llamaserve.cli import main
from llamaserve.commands import demo

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

RECORD = re.compile(r"^batch: (\d+) user: (\d+)\nprompt: (.*)\noutput: ", re.M)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = tiny_args("llama3")
    return write_hf(tmp_path_factory.mktemp("demo") / "hf", args, random_weights(args, seed=5, std=0.2))


def summary_numbers(out: str) -> dict:
    found = {}
    for key, pattern in {
        "ttft_ms": r"time to first token: mean ([\d.]+) ms",
        "decode_tps_user": r"decode: ([\d.]+) tokens/s/user",
        "decode_tps": r"\), ([\d.]+) tokens/s\n",
        "e2e_tps_user": r"end to end: ([\d.]+) tokens/s/user",
        "e2e_tps": r"tokens/s/user, ([\d.]+) tokens/s\n",
    }.items():
        m = re.search(pattern, out)
        assert m, f"summary line for {key} missing in:\n{out[-800:]}"
        found[key] = float(m.group(1))
    return found


@pytest.mark.slow
def test_demo_on_the_builtin_model(capsys):
    code = main(["demo", "--prompts", "text", "--max-tokens", "3", "--ignore-eos"])
    out, _ = capsys.readouterr()
    assert code == 0
    users = re.findall(r"^--- user (\d+) \((\d+) prompt tokens, (\d+) generated, (\w+)\) ---$", out, re.M)
    assert [int(u[0]) for u in users] == list(range(32))
    assert all(u[2] == "3" and u[3] == "length" for u in users)
    assert f"prompt: {demo.TEXT_PROMPTS[5]}" in out
    assert "gibberish by construction" in out
    nums = summary_numbers(out)
    assert all(v > 0 for v in nums.values())
    assert "users: 32, generated tokens: 96" in out


def test_demo_with_a_prompt_file_and_sampling(capsys, tmp_path, hf_dir):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([
        "plain text prompt",
        [{"role": "user", "content": "a dialog"}],
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        {"prompt": "object prompt"},
    ]))
    argv = ["demo", "--model", str(hf_dir), "--prompts", str(prompts), "--num-prompts", "6", "--max-users", "4",
            "--decoding", "sampling", "--seed", "1", "--max-tokens", "5", "--ignore-eos"]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    users = re.findall(r"^--- user (\d+) ", out, re.M)
    assert users == [str(i) for i in range(6)]
    assert 'prompt: [{"role": "user", "content": "a dialog"}]' in out
    assert "prompt: object prompt" in out
    outputs = re.findall(r"^output: (.*)$", out, re.M)
    assert main(argv) == 0  # seeded sampling: the same answers again
    assert re.findall(r"^output: (.*)$", capsys.readouterr()[0], re.M) == outputs


def test_demo_rejects_a_bad_prompt_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert main(["demo", "--prompts", str(bad)]) == 1
    assert "expected a non-empty JSON list" in capsys.readouterr()[1]
    assert main(["demo", "--prompts", str(tmp_path / "missing.json")]) == 1
    assert "file not found" in capsys.readouterr()[1]


@pytest.mark.slow
def test_demo_alpaca_limit_64_on_the_builtin_model(capsys, tmp_path):
    code = main(["demo-alpaca", "--limit", "64", "--max-tokens", "2", "--output-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0
    [path] = tmp_path.glob("demo_user_output_*.txt")
    assert re.fullmatch(r"demo_user_output_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.txt", path.name)
    text = path.read_text(encoding="utf-8")
    records = RECORD.findall(text)
    assert len(records) == 64
    assert sorted((int(b), int(u)) for b, u, _ in records) == [(b, u) for b in range(2) for u in range(32)]
    instructions = demo.shipped_instructions()
    for b, u, prompt in records:
        assert prompt == instructions[int(b) * 32 + int(u)]
    assert f"answers appended to {path}" in out
    assert "shipped with llamaserve" in err  # no AlpacaEval cache here: the shipped set is used
    summary_numbers(out)


def test_demo_alpaca_batches_follow_max_users_and_appends(capsys, tmp_path, hf_dir):
    instr = tmp_path / "instr.json"
    instr.write_text(json.dumps(["first task", "second task", "third task"]))
    argv = ["demo-alpaca", "--model", str(hf_dir), "--instructions", str(instr), "--limit", "7", "--max-users", "3",
            "--max-tokens", "3", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    capsys.readouterr()
    [path] = (tmp_path / "out").glob("demo_user_output_*.txt")
    records = RECORD.findall(path.read_text(encoding="utf-8"))
    assert sorted((int(b), int(u), p) for b, u, p in records) == [
        (0, 0, "first task"), (0, 1, "second task"), (0, 2, "third task"),
        (1, 0, "first task"), (1, 1, "second task"), (1, 2, "third task"),
        (2, 0, "first task"),
    ]


def test_alpaca_eval_is_read_offline_only_and_falls_back(monkeypatch):
    seen = {}

    def load_dataset(*args, **kwargs):
        import os

        seen["offline"] = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
        raise ConnectionError("would need the network")

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert demo.alpaca_eval_instructions() is None
    assert seen["offline"] == ("1", "1")
    assert "HF_DATASETS_OFFLINE" not in __import__("os").environ  # restored
    instructions, source = demo.load_instructions(None)
    assert instructions == demo.shipped_instructions() and "shipped" in source

    rows = [{"instruction": "from the cache"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    assert demo.load_instructions(None) == (["from the cache"], "AlpacaEval (datasets cache)")


def test_shipped_instruction_set():
    items = demo.shipped_instructions()
    assert len(items) >= 100 and len(set(items)) == len(items)
    assert all(isinstance(s, str) and len(s) > 10 for s in items)
