"""The container image's contract, tested without a container engine (none runs on this machine).

The Dockerfile is parsed; its ENTRYPOINT + CMD run here with its ENV (paths moved to temp dirs),
first against a stub `llamaserve` to check the shell logic, then for real: the server comes up
on SERVICE_PORT with the weights from MODEL_WEIGHTS_PATH, writes its weight cache under
CACHE_ROOT, and the HEALTHCHECK command passes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def one(name: str) -> str:
    found = [rest for word, rest in instructions() if word == name]
    assert found, f"Dockerfile has no {name}"
    return found[-1]


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def entry_command() -> list[str]:
    return json.loads(one("ENTRYPOINT")) + json.loads(one("CMD"))


def test_image_layout():
    env = image_env()
    assert env["CACHE_ROOT"] == "/cache" and env["MODEL_WEIGHTS_PATH"] == "/weights" and env["SERVICE_PORT"] == "7000"
    assert set(json.loads(one("VOLUME"))) == {"/cache", "/weights"}
    assert one("FROM") == "python:3.11-slim"
    assert one("USER") not in ("root", "0")
    assert any("torch==2.13.0" in rest and "whl/cpu" in rest for word, rest in instructions() if word == "RUN")
    assert "/health" in one("HEALTHCHECK")


def _run_entry(tmp_path: Path, weights: Path, extra_env: dict[str, str], path_prefix: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "MOCK_MODEL")}
    env.update(image_env())
    env.update(CACHE_ROOT=str(tmp_path / "cache"), MODEL_WEIGHTS_PATH=str(weights), **extra_env)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    return env


@pytest.mark.parametrize("has_weights", [False, True])
def test_entrypoint_shell_logic(tmp_path, has_weights):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "llamaserve"
    stub.write_text("#!/bin/sh\necho \"args=$*\"\necho \"weights=${MODEL_WEIGHTS_PATH-UNSET}\"\n")
    stub.chmod(0o755)
    weights = tmp_path / "weights"
    weights.mkdir()
    if has_weights:
        (weights / "config.json").write_text("{}")
    env = _run_entry(tmp_path, weights, {}, str(stub_dir))
    proc = subprocess.run(entry_command() + ["--max-users", "2"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "args=serve --max-users 2" in proc.stdout
    if has_weights:
        assert f"weights={weights}" in proc.stdout and proc.stderr == ""
    else:
        assert "weights=UNSET" in proc.stdout and "serving the built-in random model" in proc.stderr


@pytest.mark.slow
def test_entrypoint_serves_mounted_weights_and_passes_healthcheck(tmp_path):
    from checkpoints import random_weights, tiny_args, write_hf
    from server_fixtures import free_port, wait_for_health

    args = tiny_args("llama3")
    weights = write_hf(tmp_path / "weights", args, random_weights(args))
    port = free_port()
    env = _run_entry(tmp_path, weights, {"SERVICE_PORT": str(port), "JWT_SECRET": "container-secret"})
    log = open(tmp_path / "entry.log", "wb")
    proc = subprocess.Popen(entry_command() + ["--max-seq-len", "128", "--max-users", "2"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", [proc], 120,
                        lambda: (tmp_path / "entry.log").read_text()[-3000:])
        health = json.loads(one("HEALTHCHECK").split("CMD", 1)[1])
        assert subprocess.run(health, env=env, timeout=30).returncode == 0
        entries = list((tmp_path / "cache" / "llamaserve_weights").iterdir())
        assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
        assert list((tmp_path / "cache" / "logs").glob("serve_*.log"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # With the server gone, the health check fails (so Docker would mark the container unhealthy).
    assert subprocess.run(health, env=env, timeout=30, capture_output=True).returncode != 0
