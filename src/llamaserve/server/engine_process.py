"""The engine's own process: loads the model, then loops add/abort -> step -> send outputs.

It talks to the server only through two multiprocessing queues, so a slow model step never
blocks HTTP handling, and a crash or hang here can be detected and repaired by the server
(see engine_client.py). Messages, all plain picklable tuples:

  server -> engine   ("add", request_id, prompt_token_ids, SamplingParams)
                     ("abort", request_id)
                     ("shutdown",)
  engine -> server   ("loading", {})                 heartbeat while the model loads
                     ("ready", info)                 model name, tokenizer dir, limits
                     ("out", [RequestOutput], stats, [queue seconds of requests seated this step])
                     ("stats", stats)                heartbeat while idle
                     ("reject", request_id, kind, message, param)   kind: "overloaded" | "invalid"
                     ("fatal", message)              the model could not be loaded
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass

HEARTBEAT_S = 0.5
log = logging.getLogger("llamaserve.engine_process")


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine process needs to build its engine; picklable for spawn."""

    weights: str | None = None
    mock: bool = False
    mock_step_delay: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    max_users: int = 32
    max_seq_len: int = 4096
    prefill_chunk: int = 512
    max_queued: int = 256
    log_level: str = "info"
    log_file: str | None = None
    tensor_parallel: int = 1
    quantize: str | None = None
    cache_root: str | None = None  # converted-weight cache (used for checkpoint directories)

    @classmethod
    def from_settings(cls, settings, log_file: str | None = None) -> "EngineSpec":
        """The spec `serve` runs its engine with (a ServerSettings in): torch-free, so the engine
        process can be started before the server's own imports."""
        return cls(
            weights=settings.weights,
            mock=settings.mock,
            mock_step_delay=settings.mock_step_delay,
            dtype=settings.dtype,
            device=settings.device,
            max_users=settings.max_users,
            max_seq_len=settings.max_seq_len,
            prefill_chunk=settings.prefill_chunk,
            max_queued=settings.max_queued,
            log_level=settings.log_level,
            log_file=log_file,
            tensor_parallel=settings.tensor_parallel,
            quantize=settings.quantize,
            cache_root=settings.cache_root if settings.weight_cache else None,
        )


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def build_engine(spec: EngineSpec):
    """Returns (engine, info). The mock replaces only the Transformer; the engine is the same."""
    from llamaserve.engine.engine import Engine, EngineConfig
    from llamaserve.tokenizer import load_tokenizer

    config = EngineConfig(
        max_users=spec.max_users,
        max_seq_len=spec.max_seq_len,
        prefill_chunk=spec.prefill_chunk,
        max_queued=spec.max_queued,
    )
    if spec.mock:
        import torch

        from llamaserve.model.mock import MOCK_NAME, MockTransformer

        # The mock's tensors are small copies: extra threads only fight the server for cores.
        torch.set_num_threads(1)

        tokenizer_dir = spec.weights
        tokenizer = load_tokenizer(tokenizer_dir)
        eot = 128009 if 128009 < tokenizer.vocab_size else tokenizer.eos_id
        from llamaserve.config import BUILTIN_MODEL_ARGS

        args = BUILTIN_MODEL_ARGS.replace(vocab_size=tokenizer.vocab_size)
        model = MockTransformer(args, step_delay=spec.mock_step_delay, eot_id=eot)
        info = {"name": MOCK_NAME, "format": "mock", "is_builtin": False, "is_mock": True}
    else:
        from llamaserve.weights import load_model

        device = _resolve_device(spec.device)
        dtype = _resolve_dtype(spec.dtype, device)
        cache_root = spec.cache_root if spec.weights else None  # the built-in model is not worth caching
        from llamaserve.parallel import torchrun_rank

        if spec.tensor_parallel > 1 or torchrun_rank() is not None:
            from llamaserve.parallel import LoadSpec, load_parallel_model
            from llamaserve.weights.cache import dtype_name

            # A rank that dies takes this process down, so the supervisor restarts the group.
            load_spec = LoadSpec(spec.weights, dtype_name(dtype), device, spec.quantize, cache_root)
            loaded = load_parallel_model(load_spec, spec.tensor_parallel, progress=False, exit_on_rank_death=True)
        else:
            loaded = load_model(spec.weights, dtype=dtype, device=device, progress=False, quantize=spec.quantize,
                                cache_root=cache_root)
        model = loaded.model
        tokenizer_dir = str(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
        from llamaserve.tokenizer.table import load_decode_tokenizer

        # This process only decodes: a cached token table instead of the full tokenizer.
        tokenizer = load_decode_tokenizer(tokenizer_dir, spec.cache_root)
        info = {"name": loaded.name, "format": loaded.format, "is_builtin": loaded.is_builtin, "is_mock": False}
        if loaded.is_builtin:
            from llamaserve.weights.builtin import BUILTIN_WARNING

            log.warning(BUILTIN_WARNING)
    engine = Engine(model, tokenizer, config)
    info.update(
        tokenizer_dir=tokenizer_dir,
        family=tokenizer.family,
        max_seq_len=spec.max_seq_len,
        max_users=spec.max_users,
        pid=os.getpid(),
    )
    return engine, info


def _setup_logging(spec: EngineSpec) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if spec.log_file:
        handlers.append(logging.FileHandler(spec.log_file))
    logging.basicConfig(
        level=spec.log_level.upper(),
        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _parent_gone(parent: int) -> bool:
    # A server killed with SIGKILL runs no clean-up: its engine must notice and exit on its own
    # instead of holding the model's memory forever.
    return os.getppid() != parent


def engine_main(spec: EngineSpec, in_q, out_q) -> None:
    """Entry point of the spawned engine process."""
    # Ctrl-C and `kill` of the whole process group (systemd, a terminal) reach this process
    # too: the server decides when the engine stops, after draining its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _setup_logging(spec)
    parent = os.getppid()
    loading = threading.Event()
    loading.set()

    def loading_heartbeat() -> None:
        # Loading a large model takes minutes without returning to the loop; tell the
        # supervisor we are alive so it does not mistake the load for a hang.
        while loading.is_set():
            if _parent_gone(parent):
                log.error("the server process is gone; engine exiting")
                os._exit(1)
            out_q.put(("loading", {}))
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=loading_heartbeat, daemon=True).start()
    try:
        engine, info = build_engine(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which logs it
        loading.clear()
        # A bad path or checkpoint (ValueError/OSError) is the user's to fix: the message says
        # what; anything else is our bug and gets its traceback.
        detail = "" if isinstance(exc, (ValueError, OSError)) else "\n" + traceback.format_exc()
        log.error("engine failed to load: %s%s", exc, detail)
        out_q.put(("fatal", f"{type(exc).__name__}: {exc}"))
        time.sleep(0.2)  # let the queue's feeder thread flush
        return
    loading.clear()
    log.info("engine ready: %s (pid %d)", info["name"], os.getpid())
    out_q.put(("ready", info))
    run_loop(engine, in_q, out_q, parent)


def run_loop(engine, in_q, out_q, parent: int | None = None) -> None:
    from llamaserve.engine.engine import QueueFull
    from llamaserve.engine.request import InvalidRequest

    last_beat = 0.0
    # Request id -> when it was queued, until the scheduler seats it (vLLM's queue time).
    queued_since: dict[str, float] = {}

    def add(msg: tuple) -> None:
        _, rid, ids, params = msg
        try:
            engine.add_request(rid, ids, params)
            queued_since[rid] = time.monotonic()
        except QueueFull as exc:  # waiting requests beyond the free slots are at the bound
            out_q.put(("reject", rid, "overloaded", str(exc), None))
        except InvalidRequest as exc:
            out_q.put(("reject", rid, "invalid", str(exc), exc.param))
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the engine
            log.exception("add_request failed")
            out_q.put(("reject", rid, "invalid", f"{type(exc).__name__}: {exc}", None))

    while True:
        busy = engine.has_unfinished()
        msgs = []
        try:
            # Idle: block (that is the heartbeat period); busy: take whatever is there.
            msgs.append(in_q.get_nowait() if busy else in_q.get(timeout=HEARTBEAT_S))
            while True:
                msgs.append(in_q.get_nowait())
        except queue.Empty:
            pass
        for msg in msgs:
            kind = msg[0]
            if kind == "add":
                add(msg)
            elif kind == "abort":
                queued_since.pop(msg[1], None)
                engine.abort(msg[1])  # False when it finished before the abort arrived
            elif kind == "shutdown":
                log.info("engine shutting down")
                return
        if engine.has_unfinished():
            step_start = time.monotonic()
            outputs = engine.step()
            out_q.put(("out", outputs, engine.stats(), _seated(engine, queued_since, step_start)))
            last_beat = time.monotonic()
        elif time.monotonic() - last_beat >= HEARTBEAT_S:
            if parent is not None and _parent_gone(parent):
                log.error("the server process is gone; engine exiting")
                return
            out_q.put(("stats", engine.stats()))
            last_beat = time.monotonic()


def _seated(engine, queued_since: dict[str, float], step_start: float) -> list[float]:
    """Queue times of the requests this step took off the waiting queue."""
    if not queued_since:
        return []
    waiting = {seq.request_id for seq in getattr(engine.scheduler, "waiting", ())}
    seated = [rid for rid in queued_since if rid not in waiting]
    return [step_start - queued_since.pop(rid) for rid in seated]
