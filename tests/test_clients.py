"""The HTTP clients and the token tool against a real server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jwt
import pytest

from llamaserve.cli import main
from server_fixtures import SECRET

pytest_plugins = ["server_fixtures"]  # the session-wide `api_server`
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def token_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "llamaserve", "token", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_token_encode_is_accepted_by_the_server(api_server):
    r = token_cli("--secret", SECRET, "encode")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert jwt.decode(token, SECRET, algorithms=["HS256"]) == {"team_id": "tenstorrent", "token_id": "debug-test"}
    ok = httpx.get(api_server.url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    # --secret wins over JWT_SECRET in the environment (test_cli_help.py); the variable alone works
    r = token_cli("encode", '{"team_id": "x"}', env={"JWT_SECRET": SECRET})
    assert jwt.decode(r.stdout.strip(), SECRET, algorithms=["HS256"]) == {"team_id": "x"}


def test_token_decode_expiry_and_errors(capsys, monkeypatch):
    monkeypatch.delenv("JWT_SECRET", raising=False)
    assert main(["token", "--secret", "s3", "encode", '{"team_id": "t"}', "--expires-in", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "decode", token, "--secret", "s3"]) == 0
    claims = json.loads(capsys.readouterr().out)
    assert claims["team_id"] == "t" and "exp" in claims
    assert main(["token", "decode", token, "--secret", "other"]) == 1
    assert "invalid token" in capsys.readouterr().err
    assert main(["token", "encode", "{not json", "--secret", "s3"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["token", "sign", "--secret", "s3"]) == 1
    assert "unknown mode 'sign'" in capsys.readouterr().err
    assert main(["token", "encode"]) == 1
    assert "JWT_SECRET" in capsys.readouterr().err


def test_eval_alpaca_writes_one_valid_json_file(api_server, tmp_path, capsys):
    from llamaserve.commands.demo import shipped_instructions

    rc = main(["eval-alpaca", "--url", api_server.url, "--limit", "64", "--secret", SECRET, "--max-tokens", "8",
               "--output-dir", str(tmp_path), "--no-progress", "--instructions", _shipped(tmp_path)])
    assert rc == 0, capsys.readouterr()
    files = list(tmp_path.glob("responses_*.json"))
    assert len(files) == 1
    records = json.loads(files[0].read_text())
    assert [r["response_idx"] for r in records] == list(range(64))
    assert [r["instruction"] for r in records] == shipped_instructions()[:64]
    assert all(r["error"] is None and r["response"] and r["ttft_ms"] > 0 for r in records)
    # The test server sends the original's user stats: exact token counts (8 = --max-tokens).
    assert all(r["tokens"] == 8 and r["tokens_per_s"] > 0 for r in records)
    assert "64 ok, 0 failed" in capsys.readouterr().out


def test_eval_alpaca_openai_api_and_failures_recorded(api_server, tmp_path, capsys):
    rc = main(["eval-alpaca", "--url", api_server.url, "--api", "openai", "--limit", "4", "--secret", SECRET,
               "--max-tokens", "5", "--output-dir", str(tmp_path / "ok"), "--no-progress",
               "--instructions", _shipped(tmp_path)])
    assert rc == 0
    records = json.loads(next((tmp_path / "ok").glob("responses_*.json")).read_text())
    assert all(r["tokens"] == 5 and r["response"] for r in records)
    rc = main(["eval-alpaca", "--url", api_server.url, "--limit", "3", "--secret", "wrong-secret",
               "--output-dir", str(tmp_path / "bad"), "--no-progress", "--instructions", _shipped(tmp_path)])
    assert rc == 1
    records = json.loads(next((tmp_path / "bad").glob("responses_*.json")).read_text())
    assert len(records) == 3 and all("401" in r["error"] and r["response"] is None for r in records)
    # Each failure's reason on the terminal, not only in the JSON: the first few, then counts.
    out = capsys.readouterr().out
    assert "failed #0: RuntimeError: HTTP 401" in out and "does not verify" in out.split("failed #0:")[1].splitlines()[0]
    assert "failures by reason: 3 x HTTP 401" in out


def test_failure_report_first_few_then_counts_by_reason():
    from llamaserve.clients.common import failure_report

    errors = [(i, "RuntimeError: HTTP 503: overloaded") for i in range(4)] + [(9, "ReadTimeout: timed out")]
    lines = failure_report(errors, first=3)
    assert lines[:3] == [f"failed #{i}: RuntimeError: HTTP 503: overloaded" for i in range(3)]
    assert lines[3] == "... and 2 more failed"
    assert lines[4] == "failures by reason: 4 x HTTP 503, 1 x ReadTimeout"
    assert failure_report([]) == []


def test_results_files_are_never_overwritten_even_within_a_second(tmp_path):
    from llamaserve.clients.alpaca import Record, write_results

    paths = [write_results([Record(0, f"run {i}")], tmp_path) for i in range(3)]
    assert len(set(paths)) == 3 and len(list(tmp_path.glob("responses_*.json"))) == 3
    assert [json.loads(p.read_text())[0]["instruction"] for p in paths] == ["run 0", "run 1", "run 2"]


def _shipped(tmp_path) -> str:
    """The shipped instruction list as a file, so the test never depends on a datasets cache."""
    from llamaserve.commands.demo import shipped_instructions

    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(shipped_instructions()))
    return str(path)


@pytest.mark.parametrize("api, extra", [("openai", []), ("original", ["--request-rate", "200", "--random-range-ratio", "0.5"])])
def test_bench_serve_reports_throughput_and_latency(api_server, tmp_path, capsys, api, extra):
    out = tmp_path / "bench.json"
    rc = main(["bench-serve", "--url", api_server.url, "--api", api, "--num-prompts", "16", "--concurrency", "8",
               "--input-len", "12", "--output-len", "8", "--secret", SECRET, "--result-file", str(out), *extra])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["completed"] == 16 and rep["failed"] == 0
    assert rep["request_rate"] == (200.0 if extra else float("inf"))
    if api == "openai":
        assert rep["total_output_tokens"] == 16 * 8  # EOS ignored: exactly --output-len each
    else:  # lengths in [4, 8], each counted exactly from the server's user stats
        assert 16 * 4 <= rep["total_output_tokens"] <= 16 * 8
    assert rep["output_throughput"] > 0 and rep["ttft_ms"]["p50"] > 0 and rep["itl_ms"]["p99"] >= rep["itl_ms"]["p50"]
    text = capsys.readouterr().out
    assert "time to first token" in text and "inter-token latency" in text
    # A second run with the same --result-file keeps the first file.
    first = out.read_text()
    assert main(["bench-serve", "--url", api_server.url, "--api", api, "--num-prompts", "2", "--input-len", "4",
                 "--output-len", "2", "--secret", SECRET, "--result-file", str(out)]) == 0
    assert out.read_text() == first and json.loads((tmp_path / "bench_2.json").read_text())["completed"] == 2
    assert f"wrote {tmp_path / 'bench_2.json'}" in capsys.readouterr().out


def test_bench_serve_prints_failure_reasons(api_server, capsys):
    rc = main(["bench-serve", "--url", api_server.url, "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
               "--secret", "wrong-secret"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "failed #0: HTTP 401" in text and "failures by reason: 3 x HTTP 401" in text
