"""Server configuration: the original's environment variables, overridden by command-line flags.

The engine's flags and variables (MODEL_WEIGHTS_PATH, CACHE_ROOT, MOCK_MODEL) are EngineArgs'
(engine/args.py); the ones here are the HTTP server's own."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from llamaserve.engine.args import EngineArgs

ENV_HELP = """\
environment variables (a flag given on the command line wins):
  SERVICE_PORT        port to listen on (default 7000)                     --port
  JWT_SECRET          HS256 secret for bearer tokens; unset = a random
                      secret for this run and a printed token               --jwt-secret
  CACHE_ROOT          directory for logs (CACHE_ROOT/logs) and caches       --cache-root
  MODEL_WEIGHTS_PATH  weights directory (Meta, repacked or Hugging Face);
                      unset = the built-in random model                     --weights
  MODEL_WEIGHTS_ID    name the model is served under                        --model-name
  LLAMA_VERSION       llama3 | llama2: picks the /inference/<route> name    --llama-version
  MOCK_MODEL          1 = fake model with the same engine path              --mock
"""


@dataclass
class ServerSettings:
    """What the HTTP server needs; the engine it runs is described by `engine`."""

    engine: EngineArgs = field(default_factory=EngineArgs)
    host: str = "0.0.0.0"
    port: int = 7000
    jwt_secret: str | None = None
    no_auth: bool = False
    required_claims: list[str] = field(default_factory=lambda: ["team_id"])
    model_name: str | None = None
    llama_version: str | None = None  # None: from the tokenizer family
    max_choices: int = 64  # prompts x n of one OpenAI request
    header_timeout_s: float = 10.0  # a connection must send its request headers within this
    max_connections: int = 1024  # open HTTP connections; more are answered 503 and closed
    max_body_bytes: int = 8 * 1024 * 1024
    send_user_stats: bool = False
    overload_backoff_s: float = 0.5
    engine_timeout_s: float = 120.0
    hang_timeout_s: float = 5.0
    resume: bool = True  # requests in flight when the engine is lost continue on the restarted one
    quota_config: str | None = None  # JSON file of per-team limits (server/quotas.py)
    drain_timeout_s: float = 30.0
    log_level: str = "info"

    @property
    def auth_enabled(self) -> bool:
        return not self.no_auth


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    a = parser.add_argument
    a("--host", default=d.host, help=f"address to bind (default {d.host})")
    a("--port", type=int, default=None, help="port (env SERVICE_PORT, default 7000)")
    a("--jwt-secret", default=None, help="HS256 secret (env JWT_SECRET)")
    a("--no-auth", action="store_true", help="serve without authentication (explicit opt-out)")
    a(
        "--required-claims",
        default=",".join(d.required_claims),
        help="comma-separated claims every token must carry (default team_id; empty = none)",
    )
    a("--model-name", default=None, help="served model name (env MODEL_WEIGHTS_ID)")
    a("--llama-version", choices=["llama2", "llama3"], default=None, help="route name family (env LLAMA_VERSION)")
    a("--max-choices", type=int, default=d.max_choices,
      help=f"completions one OpenAI request may ask for, prompts x n (default {d.max_choices})")
    a("--header-timeout", type=float, default=d.header_timeout_s,
      help=f"seconds a connection has to send its request headers (default {d.header_timeout_s:g})")
    a("--max-connections", type=int, default=d.max_connections,
      help=f"open HTTP connections; more are answered 503 and closed (default {d.max_connections})")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="request bodies above this many bytes get 413")
    a("--send-user-stats", action="store_true", help="original route: append a JSON stats object after <|endoftext|>")
    a("--engine-timeout", type=float, default=d.engine_timeout_s,
      help="seconds the engine loop may go without progress (one step) before it is restarted")
    a("--hang-timeout", type=float, default=d.hang_timeout_s,
      help=f"seconds without the engine's heartbeat (every 0.5 s) before it is declared hung and restarted; "
           f"/health is 503 and new requests are refused once it is 2 s late (default {d.hang_timeout_s:g})")
    a("--no-resume", action="store_true",
      help="fail the requests in flight when the engine process is lost, instead of resuming them on the restarted engine")
    a("--quota-config", default=None, metavar="FILE",
      help="JSON file of per-team limits, the team being the token's team_id (re-read on SIGHUP or change); "
           "also turns on fair scheduling between teams")
    a("--drain-timeout", type=float, default=d.drain_timeout_s, help="on SIGTERM, seconds running requests may finish")
    a("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"], help="log verbosity")
    EngineArgs.add_cli_args(parser)


def settings_from_args(ns: argparse.Namespace, env: dict[str, str] | None = None) -> ServerSettings:
    env = dict(os.environ) if env is None else env

    def pick(flag, var):
        return flag if flag is not None else (env.get(var) or None)

    port = pick(ns.port, "SERVICE_PORT")
    try:
        port = int(port) if port is not None else 7000
    except ValueError:
        raise SystemExit(f"SERVICE_PORT must be an integer, got {env.get('SERVICE_PORT')!r}")
    llama_version = pick(ns.llama_version, "LLAMA_VERSION")
    if llama_version not in (None, "llama2", "llama3"):
        raise SystemExit(f"LLAMA_VERSION must be llama2 or llama3, got {llama_version!r}")
    engine = EngineArgs.from_cli_args(ns, env)
    _check_template(engine.chat_template)
    return ServerSettings(
        engine=engine,
        host=ns.host,
        port=port,
        jwt_secret=pick(ns.jwt_secret, "JWT_SECRET"),
        no_auth=ns.no_auth,
        required_claims=[c.strip() for c in ns.required_claims.split(",") if c.strip()],
        model_name=pick(ns.model_name, "MODEL_WEIGHTS_ID"),
        llama_version=llama_version,
        max_body_bytes=ns.max_body_bytes,
        max_choices=ns.max_choices,
        header_timeout_s=ns.header_timeout,
        max_connections=ns.max_connections,
        send_user_stats=ns.send_user_stats,
        engine_timeout_s=ns.engine_timeout,
        hang_timeout_s=ns.hang_timeout,
        quota_config=ns.quota_config,
        resume=not ns.no_resume,
        drain_timeout_s=ns.drain_timeout,
        log_level=ns.log_level,
    )


def _check_template(path: str | None) -> None:
    """A --chat-template file is read and compiled at start: a bad one stops the server here,
    not at its first chat request."""
    if path is None:
        return
    from llamaserve.tokenizer.template import ChatTemplate, read_template_file

    try:
        ChatTemplate(read_template_file(path), path, {})
    except ValueError as exc:
        raise SystemExit(f"--chat-template: {exc}") from None
