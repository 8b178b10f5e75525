"""The engine's own process: loads the model, then loops add/abort -> step -> send outputs.

It talks to the server only through two multiprocessing queues, so a slow model step never
blocks HTTP handling, and a crash or hang here can be detected and repaired by the server
(see engine_client.py). What crosses the queues is defined in engine_protocol.py.
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
from llamaserve.server.engine_protocol import (
    Abort,
    AddRequest,
    Beat,
    Fatal,
    Idle,
    Loading,
    Ready,
    Rejected,
    RejectKind,
    Shutdown,
    StepOutputs,
)

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
    from llamaserve import progress

    progress.log_only()  # progress goes to the log (and its file), whatever the terminal
    parent = os.getppid()
    loading = threading.Event()
    loading.set()

    def heartbeat() -> None:
        # Loading a large model, or one long step, takes long without returning to the loop:
        # this thread tells the supervisor the process still runs, so it does not mistake that
        # for a hang, while a stopped or frozen process goes quiet within HEARTBEAT_S.
        while not stopping.is_set():
            if _parent_gone(parent):
                log.error("the server process is gone; engine exiting")
                os._exit(1)
            out_q.put(Loading(progress.current()) if loading.is_set() else Beat())
            stopping.wait(HEARTBEAT_S)

    # Stopped before the process exits: a thread still putting on the queue then holds up the
    # queue's flush at exit until the server kills the process.
    stopping = threading.Event()
    beater = threading.Thread(target=heartbeat, daemon=True)
    beater.start()
    try:
        from llamaserve.engine.build import build_engine

        # This process only decodes: a cached token table instead of the full tokenizer. A rank
        # that dies takes this process down, so the supervisor restarts the group.
        built = build_engine(args, decode_only_tokenizer=True, exit_on_rank_death=True, progress=True)
        engine, info = built.engine, built.info
    except Exception as exc:  # noqa: BLE001 - reported to the server, which logs it
        loading.clear()
        stopping.set()
        # The server logs the message itself (once); only our bugs' tracebacks are logged here.
        if not isinstance(exc, (ValueError, OSError)):
            log.error("engine failed to load: %s\n%s", exc, traceback.format_exc())
        out_q.put(Fatal(f"{type(exc).__name__}: {exc}"))
        time.sleep(0.2)  # let the queue's feeder thread flush
        return
    loading.clear()
    log.info("engine ready: %s (pid %d); the KV cache holds %d tokens", info["name"], os.getpid(), info["kv_tokens"])
    out_q.put(Ready(info))
    try:
        run_loop(engine, in_q, out_q, parent)
    finally:
        stopping.set()
        beater.join(2 * HEARTBEAT_S)


def run_loop(engine, in_q, out_q, parent: int | None = None) -> None:
    """Serve the server's messages until Shutdown (or until the server process is gone)."""
    last_beat = 0.0
    while True:
        # Idle: block (that is the heartbeat period); busy: take whatever is there.
        for msg in _take_messages(in_q, block=not engine.has_unfinished()):
            if isinstance(msg, AddRequest):
                _add(engine, msg, out_q)
            elif isinstance(msg, Abort):
                engine.abort(msg.request_id)  # False when it finished before the abort arrived
            elif isinstance(msg, Shutdown):
                log.info("engine shutting down")
                return
        if engine.has_unfinished():
            out_q.put(StepOutputs(engine.step(), engine.stats()))
            last_beat = time.monotonic()
        elif time.monotonic() - last_beat >= HEARTBEAT_S:
            if parent is not None and _parent_gone(parent):
                log.error("the server process is gone; engine exiting")
                return
            out_q.put(Idle(engine.stats()))
            last_beat = time.monotonic()


def _take_messages(in_q, block: bool) -> list:
    msgs = []
    try:
        msgs.append(in_q.get(timeout=HEARTBEAT_S) if block else in_q.get_nowait())
        while True:
            msgs.append(in_q.get_nowait())
    except queue.Empty:
        pass
    return msgs


def _add(engine, msg: AddRequest, out_q) -> None:
    from llamaserve.engine.request import InvalidRequest, QueueFull

    try:
        engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
    except QueueFull as exc:  # waiting requests beyond the free slots are at the bound
        out_q.put(Rejected(msg.request_id, RejectKind.OVERLOADED, str(exc)))
    except InvalidRequest as exc:
        out_q.put(Rejected(msg.request_id, RejectKind.INVALID, str(exc), exc.param))
    except Exception as exc:  # noqa: BLE001 - one bad request must not kill the engine
        log.exception("add_request failed")
        out_q.put(Rejected(msg.request_id, RejectKind.INVALID, f"{type(exc).__name__}: {exc}"))
