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

from llamaserve.engine.args import EngineArgs

HEARTBEAT_S = 0.5
log = logging.getLogger("llamaserve.engine_process")


def _setup_logging(log_level: str, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _parent_gone(parent: int) -> bool:
    # A server killed with SIGKILL runs no clean-up: its engine must notice and exit on its own
    # instead of holding the model's memory forever.
    return os.getppid() != parent


def engine_main(args: EngineArgs, in_q, out_q, log_level: str = "info", log_file: str | None = None) -> None:
    """Entry point of the spawned engine process."""
    # Ctrl-C and `kill` of the whole process group (systemd, a terminal) reach this process
    # too: the server decides when the engine stops, after draining its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _setup_logging(log_level, log_file)
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
        from llamaserve.engine.build import build_engine

        # This process only decodes: a cached token table instead of the full tokenizer. A rank
        # that dies takes this process down, so the supervisor restarts the group.
        built = build_engine(args, decode_only_tokenizer=True, exit_on_rank_death=True)
        engine, info = built.engine, built.info
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
