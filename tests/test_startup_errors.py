"""Startup errors that say what to do, once: a busy port (found before the engine loads), an
unloadable checkpoint, an empty prompt."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from server_fixtures import ServerProcess, free_port


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JWT_SECRET", "MOCK_MODEL", "MODEL_WEIGHTS_PATH", "CACHE_ROOT", "SERVICE_PORT")}
    env.update(extra)
    return env


def _serve(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--no-auth", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_busy_port_is_named_before_the_engine_loads(how):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args, env = ["--host", "127.0.0.1"], _clean_env()
        if how == "flag":
            args += ["--port", str(port)]
        else:
            env["SERVICE_PORT"] = str(port)
        t0 = time.monotonic()
        res = _serve(args, env)
    assert res.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in res.stderr
    assert "--port" in res.stderr and "SERVICE_PORT" in res.stderr
    # Nothing was started: no engine process, no server log lines, no raw uvicorn error.
    out = res.stdout + res.stderr
    assert "[engine]" not in out and "Errno" not in out and "starting on" not in out
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_unloadable_checkpoint_error_is_logged_once(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = ServerProcess(tmp_path / "server.log", "--weights", str(empty))
    try:
        assert srv.proc.wait(90) == 1
        log = srv.log_text()
    finally:
        srv.stop()
    assert log.count("no recognised checkpoint files") == 1, log
    assert "giving up" in log


def test_generate_reports_a_checkpoint_error_once(tmp_path):
    res = subprocess.run([sys.executable, "-m", "llamaserve", "generate", "--prompt", "hi", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=_clean_env())
    assert res.returncode == 1
    assert res.stderr.count("no recognised checkpoint files") == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_generate_refuses_an_empty_prompt():
    res = subprocess.run([sys.executable, "-m", "llamaserve", "generate", "--prompt", ""],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    assert res.returncode == 1
    assert "--prompt is empty" in res.stderr and res.stdout == ""


def test_no_numpy_warning_at_start():
    # torch warns "Failed to initialize NumPy" on every import when numpy is missing; numpy
    # is a dependency (pyproject.toml) so a clean install starts quietly.
    res = subprocess.run([sys.executable, "-c", "import llamaserve, torch; torch.zeros(2).numpy()"],
                         capture_output=True, text=True, timeout=120, env=_clean_env())
    assert res.returncode == 0 and "NumPy" not in res.stderr, res.stderr


@pytest.mark.slow
def test_ready_token_is_printed_last_and_framed(tmp_path):
    import httpx

    srv = ServerProcess(tmp_path / "server.log", "--mock", secret=None)
    try:
        srv.wait_healthy()
        deadline = time.monotonic() + 10
        while "export AUTHORIZATION" not in srv.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = srv.log_text()
        lines = [line for line in log.splitlines() if line.strip()]
        rule = "=" * 78
        # The frame is the last output, after the engine said it is ready.
        assert lines[-1] == rule and rule in lines[-6:-1], lines[-8:]
        assert log.index("engine ready") < log.index("export AUTHORIZATION")
        assert f"llamaserve is ready on http://127.0.0.1:{srv.port}" in log
        token = log.split("export AUTHORIZATION='Bearer ", 1)[1].split("'", 1)[0]
        r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200
    finally:
        srv.stop()
