"""Server configuration: the original's environment variables, overridden by command-line flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

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


def _env_bool(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 7000
    jwt_secret: str | None = None
    no_auth: bool = False
    required_claims: list[str] = field(default_factory=lambda: ["team_id"])
    cache_root: str | None = None
    weights: str | None = None
    model_name: str | None = None
    llama_version: str | None = None  # None: from the tokenizer family
    mock: bool = False
    mock_step_delay: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    max_users: int = 32
    max_seq_len: int = 4096
    prefill_chunk: int = 512
    max_queued: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    send_user_stats: bool = False
    overload_backoff_s: float = 0.5
    engine_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    tensor_parallel: int = 1  # ranks the model is split over (engine spawns them, or torchrun's)
    quantize: str | None = None  # "int8": weight-only int8
    weight_cache: bool = True  # converted weights under CACHE_ROOT/llamaserve_weights

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
    a("--cache-root", default=None, help="logs go to CACHE_ROOT/logs (env CACHE_ROOT)")
    a("--weights", "--model", dest="weights", default=None,
      help="weights directory, 'builtin', or 'mock' (env MODEL_WEIGHTS_PATH; default the built-in random model)")
    a("--model-name", default=None, help="served model name (env MODEL_WEIGHTS_ID)")
    a("--llama-version", choices=["llama2", "llama3"], default=None, help="route name family (env LLAMA_VERSION)")
    a("--mock", action="store_true", help="fake model, same engine path (env MOCK_MODEL=1)")
    a("--mock-step-delay", type=float, default=d.mock_step_delay, help="seconds the mock sleeps per step")
    a("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    a("--device", default=d.device, help="torch device (auto = cuda if available, else cpu)")
    a("--max-users", type=int, default=d.max_users, help=f"concurrent user slots (default {d.max_users})")
    a("--max-seq-len", type=int, default=d.max_seq_len, help=f"context length per slot (default {d.max_seq_len})")
    a("--prefill-chunk", type=int, default=d.prefill_chunk, help="prompt tokens per prefill step")
    a("--max-queued", type=int, default=d.max_queued, help=f"waiting requests before 503/429 (default {d.max_queued})")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="request bodies above this get 413")
    a("--send-user-stats", action="store_true", help="original route: append a JSON stats object after <|endoftext|>")
    a("--engine-timeout", type=float, default=d.engine_timeout_s,
      help="seconds without any sign of life before the engine is declared hung and restarted")
    a("--drain-timeout", type=float, default=d.drain_timeout_s, help="on SIGTERM, seconds running requests may finish")
    a("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    a("--tensor-parallel", type=int, default=d.tensor_parallel, metavar="N",
      help="split the model over N ranks (started by the engine; under torchrun: the job's ranks)")
    a("--quantize", choices=["none", "int8"], default="none", help="int8 weight-only quantisation")
    a("--no-weight-cache", action="store_true",
      help="do not cache converted weights under CACHE_ROOT/llamaserve_weights (on by default when CACHE_ROOT is set)")


def settings_from_args(ns: argparse.Namespace, env: dict[str, str] | None = None) -> ServerSettings:
    env = dict(os.environ) if env is None else env

    def pick(flag, var):
        return flag if flag is not None else (env.get(var) or None)

    port = pick(ns.port, "SERVICE_PORT")
    try:
        port = int(port) if port is not None else 7000
    except ValueError:
        raise SystemExit(f"SERVICE_PORT must be an integer, got {env.get('SERVICE_PORT')!r}")
    weights = pick(ns.weights, "MODEL_WEIGHTS_PATH")
    mock = ns.mock or _env_bool(env, "MOCK_MODEL")
    if weights == "mock":
        mock, weights = True, None
    llama_version = pick(ns.llama_version, "LLAMA_VERSION")
    if llama_version not in (None, "llama2", "llama3"):
        raise SystemExit(f"LLAMA_VERSION must be llama2 or llama3, got {llama_version!r}")
    return ServerSettings(
        host=ns.host,
        port=port,
        jwt_secret=pick(ns.jwt_secret, "JWT_SECRET"),
        no_auth=ns.no_auth,
        required_claims=[c.strip() for c in ns.required_claims.split(",") if c.strip()],
        cache_root=pick(ns.cache_root, "CACHE_ROOT"),
        weights=None if weights == "builtin" else weights,
        model_name=pick(ns.model_name, "MODEL_WEIGHTS_ID"),
        llama_version=llama_version,
        mock=mock,
        mock_step_delay=ns.mock_step_delay,
        dtype=ns.dtype,
        device=ns.device,
        max_users=ns.max_users,
        max_seq_len=ns.max_seq_len,
        prefill_chunk=ns.prefill_chunk,
        max_queued=ns.max_queued,
        max_body_bytes=ns.max_body_bytes,
        send_user_stats=ns.send_user_stats,
        engine_timeout_s=ns.engine_timeout,
        drain_timeout_s=ns.drain_timeout,
        log_level=ns.log_level,
        tensor_parallel=getattr(ns, "tensor_parallel", 1),
        quantize=None if getattr(ns, "quantize", "none") == "none" else ns.quantize,
        weight_cache=not getattr(ns, "no_weight_cache", False),
    )
