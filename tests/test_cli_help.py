"""Every command's --help: each flag described with its default and environment variable, and
a flag given always wins over its environment variable."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jwt
import pytest

from llamaserve.cli import FLAG_WINS, build_parser, subcommand_parsers

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

# (command, flag) -> the environment variable that stands in for it.
ENV_OF = {
    **{(c, f): v for c in ("serve", "generate", "demo", "demo-alpaca")
       for f, v in (("--model", "MODEL_WEIGHTS_PATH"), ("--mock", "MOCK_MODEL"), ("--cache-root", "CACHE_ROOT"))},
    ("serve", "--port"): "SERVICE_PORT",
    ("serve", "--jwt-secret"): "JWT_SECRET",
    ("serve", "--model-name"): "MODEL_WEIGHTS_ID",
    ("serve", "--llama-version"): "LLAMA_VERSION",
    ("token", "--secret"): "JWT_SECRET",
    ("eval-alpaca", "--url"): "SERVICE_PORT",
    ("eval-alpaca", "--token"): "AUTHORIZATION",
    ("eval-alpaca", "--secret"): "JWT_SECRET",
    ("eval-alpaca", "--output-dir"): "CACHE_ROOT",
    ("bench-serve", "--url"): "SERVICE_PORT",
    ("bench-serve", "--token"): "AUTHORIZATION",
    ("bench-serve", "--secret"): "JWT_SECRET",
    ("cache", "--cache-root"): "CACHE_ROOT",
    ("cache", "--model"): "MODEL_WEIGHTS_PATH",
}


def _flags():
    for command, parser in subcommand_parsers(build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                yield command, parser, action, formatter


@pytest.mark.parametrize("command", sorted(subcommand_parsers(build_parser())))
def test_every_flag_has_help_with_its_default(command):
    bad = []
    for cmd, _, action, formatter in _flags():
        if cmd != command:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not action.help:
            bad.append(f"{name}: no help text")
            continue
        shown = formatter._expand_help(action)
        d = action.default
        if d not in (None, False, [], argparse.SUPPRESS) and "default" not in shown:
            bad.append(f"{name}: default {d!r} not shown")
    assert not bad, f"llamaserve {command}: " + "; ".join(bad)


def test_flags_name_their_environment_variable_and_help_says_the_flag_wins():
    seen = set()
    for command, parser, action, formatter in _flags():
        for flag in action.option_strings:
            var = ENV_OF.get((command, flag))
            if var:
                seen.add((command, flag))
                assert f"env {var}" in formatter._expand_help(action), (command, flag)
    assert seen == set(ENV_OF)
    for command, parser in subcommand_parsers(build_parser()).items():
        if any(c == command for c, _ in ENV_OF):
            text = parser.format_help()
            assert FLAG_WINS in text or "a flag given on the command line wins" in text, command


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "AUTHORIZATION")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "llamaserve", *args], capture_output=True, text=True, env=full,
                          timeout=60)


def test_token_secret_flag_wins_over_jwt_secret():
    r = _run("token", "encode", "--secret", "from-flag", env={"JWT_SECRET": "from-env"})
    assert r.returncode == 0, r.stderr
    assert jwt.decode(r.stdout.strip(), "from-flag", algorithms=["HS256"])["team_id"] == "tenstorrent"
    r = _run("token", "encode", env={"JWT_SECRET": "from-env"})
    assert jwt.decode(r.stdout.strip(), "from-env", algorithms=["HS256"])["team_id"] == "tenstorrent"


def test_client_auth_flags_win_over_environment(monkeypatch):
    from llamaserve.clients.common import auth_header

    monkeypatch.setenv("AUTHORIZATION", "Bearer env-token")
    monkeypatch.setenv("JWT_SECRET", "env-secret")
    assert auth_header("flag-token") == {"Authorization": "Bearer flag-token"}
    minted = auth_header(None, "flag-secret")["Authorization"].removeprefix("Bearer ")
    assert jwt.decode(minted, "flag-secret", algorithms=["HS256"])
    assert auth_header() == {"Authorization": "Bearer env-token"}
    monkeypatch.delenv("AUTHORIZATION")
    assert jwt.decode(auth_header()["Authorization"].removeprefix("Bearer "), "env-secret", algorithms=["HS256"])
