"""`llamaserve serve`: the inference API server."""

from __future__ import annotations

import argparse
import logging
import errno
import os
import socket
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


# After the drain, the seconds uvicorn gives responses to send their last bytes.
FLUSH_TIMEOUT_S = 3


def ready_banner(base: str, token: str | None, auth: bool) -> str:
    """What `serve` prints once the model is ready: the last thing on the screen, framed, so the
    token is not lost above pages of loading logs (or of pip's output before them)."""
    rule = "=" * 78
    lines = [rule, f"  llamaserve is ready on {base}"]
    if token:
        lines += ["  JWT_SECRET is not set, so this run made a random secret. Send this token:", "",
                  f"    export AUTHORIZATION='Bearer {token}'", ""]
    elif auth:
        lines += ["  get a token with `llamaserve token encode` (same JWT_SECRET) and send",
                  "  'Authorization: Bearer <token>'"]
    return "\n".join(["", *lines, rule, ""])


def draining_server(config, state, drain_timeout_s: float, on_ready=None):
    """A uvicorn server whose first SIGTERM/SIGINT starts a drain instead of closing the port:
    new requests get 503 (so clients and load balancers learn why, rather than meeting a
    refused connection), /health says "shutting down", and running requests finish, up to
    `drain_timeout_s`. Then uvicorn shuts down and the process exits with status 0 (uvicorn
    itself would re-raise the signal and die of it). A second signal stops at once."""
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_deadline: float | None = None
        announced = False

        def handle_exit(self, sig, frame) -> None:
            # Runs as a signal handler: set flags only; on_tick does the rest.
            if self.drain_deadline is None and sig in (signal.SIGTERM, signal.SIGINT):
                self.drain_deadline = time.monotonic() + drain_timeout_s
                state.draining = True
            else:
                self.should_exit = self.force_exit = True

        async def on_tick(self, counter: int) -> bool:
            if not self.announced and on_ready is not None and state.engine.ready and state.tokenizer is not None:
                self.announced = True
                on_ready()
            if self.drain_deadline is not None and not self.should_exit:
                running = state.engine.num_in_flight
                if running == 0:
                    log.info("drained: no request running; shutting down")
                    self.should_exit = True
                elif time.monotonic() >= self.drain_deadline:
                    log.warning("drain timeout (%g s): cutting %d running request(s)", drain_timeout_s, running)
                    self.should_exit = True
                elif counter % 10 == 0:
                    log.info("shutting down: refusing new requests, %d still running (up to %.0f s more)",
                             running, self.drain_deadline - time.monotonic())
            return await super().on_tick(counter)

    return DrainingServer(config)


def bind_port(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the engine starts loading: a busy port is
    reported in one line at once, not after minutes of loading (uvicorn would only log
    `[Errno 98]` once the model was ready). SystemExit with what to do when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = f"port {port} on {host} is already in use (is another server running?)"
        elif exc.errno == errno.EACCES:
            why = f"no permission to listen on port {port} (ports below 1024 need privileges)"
        else:
            why = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise SystemExit(f"llamaserve serve: error: {why}; choose another port with --port N "
                         "or SERVICE_PORT=N") from None
    return sock


def start_loading(settings, log_file: str | None) -> None:
    """Start the engine process and the server's tokenizer load before the server imports its
    web framework: the engine's torch import and model load run beside the server's imports
    instead of after them (the server process itself never imports torch)."""
    from llamaserve.server.engine_client import prestart
    from llamaserve.tokenizer.loader import find_tokenizer_dir, prefetch_tokenizer

    args = settings.engine
    prestart(args, settings.log_level, log_file)
    if args.mock:
        prefetch_tokenizer(args.model)
    else:
        prefetch_tokenizer(find_tokenizer_dir(args.model) if args.model else None)


def run(ns: argparse.Namespace) -> int:
    settings = settings_from_args(ns)
    args = settings.engine
    if args.model and not Path(args.model).exists():
        print(f"llamaserve serve: error: weights directory {args.model} (--weights / MODEL_WEIGHTS_PATH) "
              "does not exist", file=sys.stderr)
        return 1
    try:
        args.validate(cli=True)
    except ValueError as exc:
        print(f"llamaserve serve: error: {exc}", file=sys.stderr)
        return 1
    if settings.quota_config:
        from llamaserve.server.quotas import Quotas

        try:
            Quotas(settings.quota_config)
        except ValueError as exc:
            print(f"llamaserve serve: error: {exc} (--quota-config)", file=sys.stderr)
            return 1
    # The test of parallel.group.torchrun_rank, which cannot be imported without torch (~1 s).
    if "TORCHELASTIC_RUN_ID" in os.environ or "GROUP_RANK" in os.environ:
        from llamaserve.parallel import maybe_follow, torchrun_rank

        # torchrun ranks other than 0 follow the engine that rank 0's server runs.
        if not args.mock and torchrun_rank() is not None:
            code = maybe_follow(args.load_spec(), args.tensor_parallel)
            if code is not None:
                return code
    sock = bind_port(settings.host, settings.port)
    log_file = setup_logging(settings.log_level, args.cache_root)
    start_loading(settings, log_file)

    import uvicorn

    from llamaserve.server.app import create_app
    from llamaserve.server.auth import DEFAULT_PAYLOAD, encode_token, new_secret

    host_for_url = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host_for_url}:{settings.port}"
    token: str | None = None  # printed when the model is ready (ready_banner)
    if settings.no_auth:
        log.warning("authentication is OFF (--no-auth): anyone who can reach the port can use the model")
    elif not settings.jwt_secret:
        settings.jwt_secret = new_secret()
        token = encode_token(DEFAULT_PAYLOAD, settings.jwt_secret)
        log.info("JWT_SECRET is not set: generated a random secret for this run; its token is printed when "
                 "the model is ready")
    else:
        log.info("auth on: get a token with `JWT_SECRET=... llamaserve token encode` "
                 "and send 'Authorization: Bearer <token>'")
    what = "mock model" if args.mock else (args.model or "built-in random model (no weights given)")
    log.info("llamaserve starting on %s, model: %s, %d user slots, context %d", base, what,
             args.max_users, args.max_seq_len)
    if log_file:
        log.info("logging to %s", log_file)
    holder: dict[str, uvicorn.Server] = {}

    def on_fatal(reason: str) -> None:
        # The engine client has logged `reason` already: one line per error.
        log.error("giving up: the model cannot be loaded (reason above); exiting with status 1")
        holder["server"].should_exit = True

    app = create_app(settings, log_file=log_file, on_fatal=on_fatal)
    from llamaserve.server.http_guard import guarded_protocol

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=FLUSH_TIMEOUT_S, log_config=None,
                            access_log=settings.log_level == "debug",
                            http=guarded_protocol(settings.header_timeout_s, settings.max_connections))
    banner = ready_banner(base, token, settings.auth_enabled)
    server = holder["server"] = draining_server(config, app.state.llamaserve, settings.drain_timeout_s,
                                                on_ready=lambda: print(banner, flush=True))
    server.run(sockets=[sock])
    from llamaserve.server.engine_protocol import EngineState

    return 1 if app.state.llamaserve.engine.state == EngineState.FAILED else 0
