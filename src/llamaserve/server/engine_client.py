"""The server's async handle on the engine process: submit, stream, abort, and supervise.

A pump thread reads the engine's output queue and hands each RequestOutput to the asyncio
queue of its request. The same thread is the supervisor: when the engine process exits, misses
its heartbeat for `hang_timeout_s` (stopped, frozen), or its loop makes no progress for
`engine_timeout_s` (wedged in a step), every in-flight request is ended with an error, the
process is (killed and) started again, and the server reports unhealthy until it is ready.
A heartbeat late by more than LATE_S already makes the server unhealthy and refuse new requests.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from llamaserve.engine.args import EngineArgs
from llamaserve.engine.request import InvalidRequest, RequestOutput, SamplingParams
from llamaserve.server.engine_process import engine_main
from llamaserve.server.engine_protocol import (
    Abort,
    AddRequest,
    Beat,
    EngineState,
    Fatal,
    FromEngine,
    Idle,
    Loading,
    Ready,
    Rejected,
    RejectKind,
    Shutdown,
    StepOutputs,
    ToEngine,
)
from llamaserve.server.errors import EngineFailed, EngineLost, EngineOverloaded, EngineUnavailable

log = logging.getLogger("llamaserve.engine_client")
FATAL_PREFIX = "the engine could not start: "
STATUS_LOG_S = 10.0
LATE_S = 2.0  # the engine beats every 0.5 s: this late, it is stopped or starved


# An engine process is started for (EngineArgs, log level, log file).
ProcessKey = tuple[EngineArgs, str, "str | None"]
# Engine processes started by `prestart`, each waiting for the EngineClient of its key.
_prestarted: dict[ProcessKey, tuple[Any, Any, Any]] = {}
_prestarted_lock = threading.Lock()


def _spawn(key: ProcessKey) -> tuple[Any, Any, Any]:
    args, log_level, log_file = key
    ctx = mp.get_context("spawn")
    in_q, out_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=engine_main, args=(args, in_q, out_q, log_level, log_file), name="llamaserve-engine",
                       daemon=True)
    proc.start()
    return proc, in_q, out_q


def prestart(args: EngineArgs, log_level: str = "info", log_file: str | None = None) -> int:
    """Start the engine process now, before the server imports its web framework, so both load
    side by side; the first EngineClient with equal arguments adopts it instead of spawning one.
    Returns its pid."""
    key = (args, log_level, log_file)
    with _prestarted_lock:
        if key not in _prestarted:
            _prestarted[key] = _spawn(key)
        return _prestarted[key][0].pid


def _take_prestarted(key: ProcessKey) -> tuple[Any, Any, Any] | None:
    """The process prestarted for `key`; any other prestarted one is stopped (unused, it would
    hold a second copy of a model)."""
    with _prestarted_lock:
        mine = _prestarted.pop(key, None)
        others = list(_prestarted.values())
        _prestarted.clear()
    for proc, in_q, out_q in others:
        log.warning("stopping an engine process (pid %d) started for other settings", proc.pid)
        proc.kill()
        proc.join(3)
        for q in (in_q, out_q):
            q.close()
            q.cancel_join_thread()
    return mine


class EngineClient:
    def __init__(
        self,
        args: EngineArgs,
        engine_timeout_s: float = 120.0,
        hang_timeout_s: float = 5.0,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
        restart_backoff_s: float = 1.0,
        on_fatal: Callable[[str], None] | None = None,
        log_level: str = "info",
        log_file: str | None = None,
    ) -> None:
        self.args = args
        self._process_key: ProcessKey = (args, log_level, log_file)
        self.engine_timeout_s = engine_timeout_s
        self.hang_timeout_s = hang_timeout_s
        self._last_beat = time.monotonic()  # when the pump last heard anything from the engine
        self.restart_backoff_s = restart_backoff_s
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._in_q = None
        self._out_q = None
        self._proc = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = EngineState.STARTING
        self.loading_progress: dict | None = None  # progress.current() of the engine while it loads
        self.info: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {}
        self.last_error: str | None = None
        self.restarts = 0
        self.crashes = 0  # engine losses with requests failed (or resumed)
        self._last_status_key = (0, 0)
        self.ready_event = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.ready_event = asyncio.Event()
        self._thread = threading.Thread(target=self._supervise, name="engine-pump", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY and not self.heartbeat_late

    @property
    def heartbeat_late(self) -> bool:
        return self.state == EngineState.READY and time.monotonic() - self._last_beat > LATE_S

    @property
    def status_text(self) -> str:
        return "not responding (heartbeat late)" if self.heartbeat_late else str(self.state)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._send(Shutdown())
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout + 2)
        if self.state != EngineState.FAILED:
            self.state = EngineState.STOPPED

    # ---- requests --------------------------------------------------------------------------

    def _send(self, msg: ToEngine) -> None:
        q = self._in_q
        if q is not None:
            try:
                q.put(msg)
            except (ValueError, OSError):
                pass  # the queue was closed by a restart; the request is failed separately

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs, the last one with `finished`. Leaving the loop early
        (client gone, task cancelled) aborts the request in the engine."""
        if not self.ready:
            raise EngineUnavailable(f"the engine is {self.status_text}; try again shortly")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._send(AddRequest(request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True  # the engine already dropped it (rejected or dead)
                    raise item
                # Before the yield: a consumer that stops at the last output closes this
                # generator at the yield, and must not send the engine an abort for it.
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(Abort(request_id))

    # ---- the pump / supervisor thread ------------------------------------------------------

    def _call(self, fn, *args) -> None:
        """Runs fn on the event loop and waits, so state changes are ordered with requests."""
        assert self._loop is not None
        if self._loop.is_closed():
            return

        async def run():
            fn(*args)

        try:
            asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - loop shutting down
            pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _reject(self, msg: Rejected) -> None:
        q = self._streams.get(msg.request_id)
        if q is not None:
            overloaded = msg.kind == RejectKind.OVERLOADED
            q.put_nowait(EngineOverloaded(msg.message) if overloaded else InvalidRequest(msg.message, msg.param))

    def _fail_all(self, reason: str, state: EngineState) -> None:
        self.state = state
        self.ready_event.clear()
        self.last_error = reason
        self.crashes += 1
        for q in self._streams.values():
            q.put_nowait(EngineLost(reason, self.crashes))
        self._streams.clear()

    def _set_ready(self, info: dict[str, Any]) -> None:
        self.info = info
        self.loading_progress = None
        self.state = EngineState.READY
        self.ready_event.set()

    def _supervise(self) -> None:
        while not self._closing.is_set():
            reason = self._run_one_engine()
            if self._closing.is_set():
                break
            if self.info is None and reason.startswith(FATAL_PREFIX):
                # The model never loaded: restarting would fail the same way (bad path, bad
                # weights). Say so and let the server exit.
                log.error("%s", reason)
                self._call(self._fail_all, reason, EngineState.FAILED)
                if self._on_fatal is not None:
                    self._on_fatal(reason)
                break
            self.restarts += 1
            log.error("engine lost: %s; restarting it", reason)
            time.sleep(self.restart_backoff_s)
        self._stop_process()

    def _run_one_engine(self) -> str:
        """Start (or adopt) one engine process and pump its messages until it is lost or the
        client closes; returns why it ended."""
        prestarted = _take_prestarted(self._process_key)
        proc, in_q, out_q = prestarted or _spawn(self._process_key)
        self._in_q, self._proc, self._out_q = in_q, proc, out_q
        self._call(setattr, self, "state", EngineState.LOADING)
        log.info("engine process %s (pid %d)", "started" if prestarted is None else "adopted", proc.pid)
        last_seen = last_status = self._last_beat = time.monotonic()
        while not self._closing.is_set():
            try:
                msg = out_q.get(timeout=0.1)
            except queue.Empty:
                msg = None
            except Exception as exc:  # noqa: BLE001 - a message torn by a killed process
                return self._lose(f"engine output queue broke: {exc}")
            now = time.monotonic()
            if msg is not None:
                self._last_beat = now
            elif not proc.is_alive():
                return self._lose(f"the engine process exited (code {proc.exitcode})")
            if now - self._last_beat > self.hang_timeout_s:
                proc.kill()
                proc.join(5)
                return self._lose(f"the engine stopped answering (no heartbeat for {self.hang_timeout_s:g} s) "
                                  f"and was restarted")
            if now - last_seen > self.engine_timeout_s and now - self._last_beat <= LATE_S:
                # Beating but not stepping: the loop is wedged (a stopped process is the case above)
                proc.kill()
                proc.join(5)
                return self._lose(f"the engine made no progress for {self.engine_timeout_s:g} s and was restarted")
            if msg is None or isinstance(msg, Beat):
                continue
            last_seen = now
            if now - last_status >= STATUS_LOG_S:
                last_status = now
                self._log_status()
            lost = self._handle(msg, proc)
            if lost is not None:
                return lost
        return "shutdown"

    def _handle(self, msg: FromEngine, proc) -> str | None:
        """Act on one engine message (on the pump thread); returns why the engine is lost, if it is."""
        if isinstance(msg, StepOutputs):
            self.stats = msg.stats
            if msg.outputs:
                self._loop.call_soon_threadsafe(self._dispatch, msg.outputs)
        elif isinstance(msg, Idle):
            self.stats = msg.stats
        elif isinstance(msg, Rejected):
            self._loop.call_soon_threadsafe(self._reject, msg)
        elif isinstance(msg, Ready):
            if self._on_ready is not None:
                try:
                    self._on_ready(msg.info)
                except Exception as exc:  # noqa: BLE001
                    log.exception("server could not use the engine")
                    proc.kill()
                    return self._lose(f"server-side setup failed: {exc}")
            log.info("engine ready (pid %d)", proc.pid)  # before: serve's ready banner must come last
            self._call(self._set_ready, msg.info)
        elif isinstance(msg, Fatal):
            proc.join(5)
            return self._lose(f"{FATAL_PREFIX}{msg.message}")
        elif isinstance(msg, Loading):
            self.loading_progress = msg.progress
        return None

    def _log_status(self) -> None:
        """The original printed its queue size and active users every second; every
        STATUS_LOG_S while anything is running or waiting is enough to follow the load."""
        st = self.stats
        key = (st.get("num_running", 0), st.get("num_waiting", 0))
        if key != (0, 0) or key != self._last_status_key:
            log.info("status: %d running, %d waiting, %d in flight, cache %.0f%%",
                     key[0], key[1], len(self._streams), 100 * float(st.get("cache_usage", 0.0)))
        self._last_status_key = key

    def _lose(self, reason: str) -> str:
        self._call(self._fail_all, reason, EngineState.RESTARTING)
        self._stop_process()
        return reason

    def _stop_process(self) -> None:
        proc, in_q = self._proc, self._in_q
        if proc is None:
            return
        if proc.is_alive() and in_q is not None:
            try:
                in_q.put(Shutdown())
            except (ValueError, OSError):
                pass
            proc.join(3)
        if proc.is_alive():
            proc.kill()
            proc.join(3)
        for q in (in_q, self._out_q):
            if q is not None:
                q.close()
                q.cancel_join_thread()
        # Dropping the references lets the queues' semaphores be released now, not reported
        # as leaked at exit.
        self._in_q = self._out_q = None
