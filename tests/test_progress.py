"""Progress of the long waits where no terminal shows a bar: a `serve` subprocess logs its weight
loading (bytes and tensors) and its kernel compilation, and /health says what the load is doing;
`demo` prints a live tokens/s line; a missing compiler says what it costs and how to get one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from checkpoints import random_weights, tiny_args, write_meta
from llamaserve.progress import INTERVAL_ENV, MIN_BYTES_ENV
from server_fixtures import ServerProcess


@pytest.mark.slow
def test_serve_logs_loading_and_compiling_and_health_says_how_far(tmp_path):
    args = tiny_args("llama3", small_vocab=True)
    ckpt = write_meta(tmp_path / "meta", args, random_weights(args), n_shards=2)
    # The threshold lowered so that a tiny checkpoint counts as large; an empty kernel cache so
    # that the kernels compile (seconds in which /health must say so).
    env = {MIN_BYTES_ENV: "0", INTERVAL_ENV: "0", "LLAMASERVE_KERNEL_CACHE": str(tmp_path / "kernels")}
    srv = ServerProcess(tmp_path / "serve.log", "--weights", str(ckpt), env=env)
    seen = []
    try:
        while srv.proc.poll() is None:
            time.sleep(0.05)
            try:
                r = httpx.get(f"{srv.url}/health", timeout=2)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                break
            seen.append(r.json())
        srv.wait_healthy(timeout=5)
        log = srv.log_text()
    finally:
        srv.stop()
    # Loading, in the log (not a terminal: no bar), with bytes and tensors.
    assert "loading meta: 0 B / " in log and "/21 tensors" in log
    assert "loading meta: " in log and " tensors in " in log
    assert "compiling CPU decode kernels, first start only" in log
    # /health while loading: 503, what it is doing and how far along.
    compiling = [b for b in seen if "compiling CPU decode kernels" in b["message"]]
    assert compiling, seen
    assert compiling[0]["progress"]["what"].startswith("compiling CPU decode kernels")
    assert compiling[0]["message"].startswith("engine loading: ")


def test_demo_prints_live_progress_when_not_a_terminal():
    env = {**os.environ, INTERVAL_ENV: "0"}
    res = subprocess.run([sys.executable, "-m", "llamaserve", "demo", "--prompts", "text", "--num-prompts", "2",
                          "--max-users", "2", "--max-tokens", "3", "--ignore-eos"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if "llamaserve: generating:" in line]
    assert len(lines) >= 3 and "running" in lines[1] and "tokens/s" in lines[1], res.stderr
    assert "6 tokens" in res.stderr
    assert "generating: 2 requests in " in lines[-1]


def test_missing_compiler_says_decode_falls_back_and_how_to_install_one(tmp_path):
    script = ("import logging; logging.basicConfig(level=logging.INFO)\n"
              "from llamaserve import kernels\n"
              "assert kernels.load('pointwise') is None and kernels.load('decode_attention') is None\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "LLAMASERVE_KERNEL_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("no C++ compiler found") == 1  # once per process, not per kernel
    assert "decode falls back to plain torch ops" in res.stderr and "apt-get install g++" in res.stderr
