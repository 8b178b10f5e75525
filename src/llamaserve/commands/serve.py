"""`llamaserve serve`: the inference API server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from llamaserve.server.settings import ENV_HELP, add_server_arguments, settings_from_args

log = logging.getLogger("llamaserve.server")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP inference server (original API + OpenAI API)",
        description="Serve a Llama 2/3 model over HTTP: the original /inference and /chat routes, "
        "the OpenAI API, /health and /metrics. With no weights, serves the built-in random model.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def setup_logging(level: str, cache_root: str | None) -> str | None:
    """Logs to stdout and, when CACHE_ROOT is set, to CACHE_ROOT/logs/serve_<time>.log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    log_file = None
    if cache_root:
        log_dir = Path(cache_root) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = str(log_dir / f"serve_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}.log")
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    return log_file


def run(ns: argparse.Namespace) -> int:
    import uvicorn

    from llamaserve.server.app import create_app
    from llamaserve.server.auth import DEFAULT_PAYLOAD, encode_token, new_secret

    settings = settings_from_args(ns)
    if settings.weights and not Path(settings.weights).exists():
        print(f"llamaserve serve: error: weights directory {settings.weights} (--weights / MODEL_WEIGHTS_PATH) "
              "does not exist", file=sys.stderr)
        return 1
    from llamaserve.parallel.follower import maybe_follow_server

    code = maybe_follow_server(settings)  # torchrun ranks other than 0 follow rank 0's engine
    if code is not None:
        return code
    log_file = setup_logging(settings.log_level, settings.cache_root)
    host_for_url = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host_for_url}:{settings.port}"
    if settings.no_auth:
        log.warning("authentication is OFF (--no-auth): anyone who can reach the port can use the model")
    elif not settings.jwt_secret:
        settings.jwt_secret = new_secret()
        token = encode_token(DEFAULT_PAYLOAD, settings.jwt_secret)
        log.info("JWT_SECRET is not set: generated a random secret for this run. Ready-to-use token:")
        print(f"\n    export AUTHORIZATION='Bearer {token}'\n", flush=True)
    else:
        log.info("auth on: get a token with `JWT_SECRET=... llamaserve token encode` "
                 "and send 'Authorization: Bearer <token>'")
    what = "mock model" if settings.mock else (settings.weights or "built-in random model (no weights given)")
    log.info("llamaserve starting on %s, model: %s, %d user slots, context %d", base, what,
             settings.max_users, settings.max_seq_len)
    if log_file:
        log.info("logging to %s", log_file)
    holder: dict[str, uvicorn.Server] = {}

    def on_fatal(reason: str) -> None:
        log.error("giving up: %s", reason)
        holder["server"].should_exit = True

    app = create_app(settings, log_file=log_file, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)), log_config=None,
                            access_log=settings.log_level == "debug")
    server = holder["server"] = uvicorn.Server(config)
    server.run()
    return 1 if app.state.llamaserve.engine.state == "failed" else 0
