"""Server configuration from the original's environment variables and the flags that override
them, the announcement of the built-in model, and the route names."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from llamaserve.server.settings import ENV_HELP, add_server_arguments, settings_from_args
from server_fixtures import ServerProcess


def parse(argv: list[str], env: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from_args(parser.parse_args(argv), env)


def test_environment_variables_and_defaults():
    s = parse([], {})
    assert (s.port, s.jwt_secret, s.engine.model, s.engine.mock, s.llama_version) == (7000, None, None, False, None)
    assert s.required_claims == ["team_id"]
    env = {"SERVICE_PORT": "7123", "JWT_SECRET": "abc", "CACHE_ROOT": "/tmp/c", "MODEL_WEIGHTS_PATH": "/w",
           "MODEL_WEIGHTS_ID": "my-llama", "LLAMA_VERSION": "llama2", "MOCK_MODEL": "1"}
    s = parse([], env)
    assert (s.port, s.jwt_secret, s.engine.cache_root, s.engine.model, s.model_name, s.llama_version, s.engine.mock) == (
        7123, "abc", "/tmp/c", "/w", "my-llama", "llama2", True)


def test_flags_override_environment():
    env = {"SERVICE_PORT": "7123", "JWT_SECRET": "abc", "MODEL_WEIGHTS_PATH": "/w", "LLAMA_VERSION": "llama2"}
    s = parse(["--port", "9000", "--jwt-secret", "flag", "--weights", "/other", "--llama-version", "llama3",
               "--required-claims", "team_id,sub", "--max-queued", "5"], env)
    assert (s.port, s.jwt_secret, s.engine.model, s.llama_version) == (9000, "flag", "/other", "llama3")
    assert s.required_claims == ["team_id", "sub"] and s.engine.max_queued == 5
    assert parse(["--model", "mock"], {}).engine.mock is True
    assert parse(["--model", "builtin"], env).engine.model is None
    assert parse(["--required-claims", ""], {}).required_claims == []


def test_bad_environment_values_are_named():
    with pytest.raises(SystemExit, match="SERVICE_PORT"):
        parse([], {"SERVICE_PORT": "seven"})
    with pytest.raises(SystemExit, match="LLAMA_VERSION"):
        parse([], {"LLAMA_VERSION": "llama4"})


def test_help_documents_environment(capsys):
    from llamaserve.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for var in ("SERVICE_PORT", "JWT_SECRET", "CACHE_ROOT", "MODEL_WEIGHTS_PATH", "MODEL_WEIGHTS_ID",
                "LLAMA_VERSION", "MOCK_MODEL"):
        assert var in out and var in ENV_HELP


@pytest.mark.slow
def test_no_weights_announces_the_builtin_model(tmp_path):
    # Only the announcement is checked here: loading the built-in weights takes long on a
    # shared CPU (and may be over before the port opens on a fast one), and the mock covers the
    # serving path (the same engine code).
    srv = ServerProcess(tmp_path / "server.log", "--max-users", "2", "--max-seq-len", "128")
    try:
        deadline = time.monotonic() + 60
        while "starting on" not in srv.log_text():
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log_text()
            time.sleep(0.1)
        log = srv.log_text()
        assert "built-in random model (no weights given)" in log
        assert "llamaserve token encode" in log  # how to get a token
        assert srv.url in log
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.slow
def test_health_is_503_while_loading_and_a_killed_server_leaves_no_loading_engine(tmp_path):
    from llamaserve.model.mock import LOAD_GATE_ENV

    # The mock is held loading until the gate file exists, which it never does here.
    srv = ServerProcess(tmp_path / "server.log", "--mock", env={LOAD_GATE_ENV: str(tmp_path / "never")})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(srv.url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log_text()
                time.sleep(0.1)
        assert r.status_code == 503 and "loading" in r.json()["message"]
        # A server killed outright runs no clean-up: its engine, still loading, must exit by itself.
        engine_pid = srv.status()["engine_pid"]
        assert engine_pid and _alive(engine_pid)
        srv.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(engine_pid):
            assert time.monotonic() < deadline, "the engine process outlived its killed server"
            time.sleep(0.1)
    finally:
        srv.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the killed server, cannot reap it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_route_name_follows_llama_version_and_model_name_is_an_alias():
    from llamaserve.server.app import create_app
    from llamaserve.server.settings import ServerSettings
    from server_fixtures import ThreadedServer

    app = create_app(ServerSettings(no_auth=True, llama_version="llama2"))
    state = app.state.llamaserve
    state.engine._on_ready({"name": "my-weights", "family": "llama3", "tokenizer_dir": None, "is_builtin": False})
    srv = ThreadedServer(app)
    try:
        codes = {path: httpx.post(srv.url + path, json={"text": "hi"}).status_code
                 for path in ("/inference/llama2-70b", "/inference/my-weights", "/chat/llama2-70b",
                              "/inference/llama3-70b", "/chat/other")}
    finally:
        srv.stop()
    # 503: the route exists but no engine runs in this test; 404: not a name this server serves.
    assert codes == {"/inference/llama2-70b": 503, "/inference/my-weights": 503, "/chat/llama2-70b": 503,
                     "/inference/llama3-70b": 404, "/chat/other": 404}


@pytest.mark.slow
def test_unloadable_weights_make_serve_exit_1_naming_the_problem(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--no-auth", "--weights", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and str(tmp_path / "nope") in missing.stderr
    # A directory without a checkpoint: the engine process fails to load it; the server must
    # not keep restarting it forever, and must say why.
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = ServerProcess(tmp_path / "server.log", "--weights", str(empty))
    assert srv.proc.wait(90) == 1
    log = srv.log_text()
    assert "the engine could not start" in log and str(empty) in log
    srv.stop()
