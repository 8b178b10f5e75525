"""Start a real `llamaserve serve` subprocess on a free loopback port and talk to it.

Also a pytest plugin (`pytest_plugins = ["server_fixtures"]`) for the session-wide `api_server`;
modules may import it first, hence no assertion rewriting here: PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llamaserve.server.auth import DEFAULT_PAYLOAD, encode_token

SECRET = "test-secret-456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, processes: list[subprocess.Popen], timeout: float, log_tail) -> None:
    """Poll `url`/health until it answers 200; fail with `log_tail()` if any of `processes`
    exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"server exited with {dead[0].returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{log_tail()}")


class ServerProcess:
    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None, secret: str | None = SECRET) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = secret
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "llamaserve", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("JWT_SECRET", "MOCK_MODEL", "MODEL_WEIGHTS_PATH", "CACHE_ROOT", "SERVICE_PORT")}
        if secret is not None:
            full_env["JWT_SECRET"] = secret
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def headers(self) -> dict[str, str]:
        if self.secret is None:
            return {}
        return {"Authorization": f"Bearer {encode_token(DEFAULT_PAYLOAD, self.secret)}"}

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 90.0) -> None:
        wait_for_health(self.url, [self.proc], timeout, lambda: self.log_text()[-4000:])

    def status(self) -> dict:
        # /status needs a token; a server started without a secret prints one (its `auth`).
        return httpx.get(f"{self.url}/status", headers=getattr(self, "auth", None) or self.headers, timeout=5).json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_server(tmp_path: Path, *args: str, **kwargs) -> ServerProcess:
    server = ServerProcess(tmp_path / "server.log", *args, **kwargs)
    try:
        server.wait_healthy()
    except Exception:
        server.stop(signal.SIGKILL)
        raise
    return server


class ThreadedServer:
    """uvicorn in a thread on a loopback port, for tests of the HTTP layer that do not need the
    engine (lifespan off: the engine process is never started)."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


API_SERVER_ARGS = ("--mock", "--max-users", "32", "--max-seq-len", "256", "--send-user-stats",
                   "--max-body-bytes", "65536")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """One mock-model server shared by the API and client tests (each start costs seconds)."""
    srv = start_server(tmp_path_factory.mktemp("api"), *API_SERVER_ARGS)
    yield srv
    srv.stop()
