"""What every route shares: settings, auth, tokenizer, metrics, the engine handle, and the
helpers that turn an HTTP request into an engine request (body limit, auth, disconnects)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from llamaserve.engine.request import FinishReason, InvalidRequest, RequestOutput, SamplingParams
from llamaserve.server.auth import AuthError, Authenticator
from llamaserve.server.engine_client import EngineClient
from llamaserve.server.errors import EngineFailed, EngineOverloaded, EngineUnavailable
from llamaserve.server.fair_gate import FairGate, GateFull
from llamaserve.server.metrics import ServerMetrics
from llamaserve.server.protocol import ApiError
from llamaserve.server.quotas import NO_TEAM, Quotas, QuotaExceeded
from llamaserve.server.resume import Replay, ResumeCoordinator, seeded
from llamaserve.server.settings import ServerSettings

T = TypeVar("T")
log = logging.getLogger("llamaserve.server")


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


class ServerState:
    def __init__(self, settings: ServerSettings, engine: EngineClient, authenticator: Authenticator | None) -> None:
        self.settings = settings
        self.engine = engine
        self.auth = authenticator
        self.metrics = ServerMetrics(settings.model_name or "llamaserve")
        self.tokenizer = None  # set when the engine reports ready (server/app.py)
        self.model_name: str = settings.model_name or "llamaserve"
        self.route_name = "llama3-70b"
        self.draining = False
        self.quotas = Quotas(settings.quota_config, self.metrics)
        # Slots handed out fairly between teams only when quotas are configured.
        self.resume = ResumeCoordinator()
        self.gate = FairGate(settings.engine.max_users, settings.engine.max_queued) if self.quotas.enabled else None

    def engine_ready(self, info: dict[str, Any]) -> None:
        """The engine process has loaded its model (`info`: engine_process Ready): the tokenizer
        must exist before the first request is accepted; names follow the model."""
        from llamaserve.tokenizer import load_tokenizer

        if self.tokenizer is None:
            tok = load_tokenizer(info.get("tokenizer_dir"))
            tok.cover_vocab(info.get("vocab_size", 0))  # ids of a padded model vocabulary decode too
            template = self.settings.engine.chat_template
            self.tokenizer = tok.with_chat_template(template) if template else tok
        if info.get("max_seq_len") and info["max_seq_len"] != self.settings.engine.max_seq_len:
            # lowered to the model's max_position_embeddings by the engine: the routes check against it
            self.settings.engine = self.settings.engine.replace(max_seq_len=info["max_seq_len"])
        self.model_name = self.settings.model_name or info["name"]
        self.metrics.model_name = self.model_name
        version = self.settings.llama_version or ("llama2" if info.get("family") == "llama2" else "llama3")
        self.route_name = f"{version}-70b"
        if info.get("is_builtin"):
            log.warning("no weights given: serving the BUILT-IN model (seeded random weights, gibberish output)")
        log.info("model %s ready: POST /inference/%s, /chat/%s, /v1/completions, /v1/chat/completions",
                 self.model_name, self.route_name, self.route_name)

    # ---- names ---------------------------------------------------------------------------

    def served_names(self) -> set[str]:
        return {self.model_name, self.route_name}

    # ---- request plumbing ----------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes", type="invalid_request_error")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def authenticate(self, request: Request) -> dict[str, Any] | None:
        if self.auth is None:
            return None
        try:
            return self.auth.verify_header(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, str(exc), type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}) from None

    def check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.engine.ready or self.tokenizer is None:
            raise ApiError(503, f"the model is not ready (engine {self.engine.status_text}); try again shortly",
                           type="server_error", code="engine_unavailable", headers={"Retry-After": "1"})

    def room_for(self, parts: int) -> str | None:
        """None if `parts` more requests fit in the engine's slots and queue together with every
        request in flight, else why not."""
        capacity = self.settings.engine.max_users + self.settings.engine.max_queued
        taken = self.engine.num_in_flight
        if taken + parts > capacity:
            return f"{parts} completions do not fit in the queue now ({taken} of {capacity} places taken); try again later"
        return None

    def check_prompt_fits(self, n_tokens: int) -> None:
        limit = self.settings.engine.max_seq_len
        if n_tokens >= limit:
            raise ApiError(400, f"the prompt is {n_tokens} tokens; the context limit is {limit} tokens "
                                f"(prompt plus at least one generated token must fit)", param="prompt",
                           code="context_length_exceeded")

    @staticmethod
    def team_of(claims: dict[str, Any] | None) -> str:
        team = (claims or {}).get("team_id")
        return str(team)[:128] if team not in (None, "") else NO_TEAM

    def admit(self, team: str, gens: list["Generation"], max_tokens_given: bool) -> None:
        """QuotaExceeded when the team is over a limit; else the request counts for the team.
        A max_tokens the client did not choose is lowered to the team's limit instead."""
        cap = self.quotas.limits_of(team)["max_tokens"]
        if cap is not None and not max_tokens_given:
            for g in gens:
                g.params.max_tokens = min(g.params.max_tokens, cap)
        self.quotas.admit(team, len(gens), sum(len(g.prompt_ids) for g in gens),
                          max((g.params.max_tokens for g in gens), default=0))

    def generation(self, prompt_ids: list[int], params: SamplingParams, team: str = NO_TEAM) -> "Generation":
        return Generation(self, prompt_ids, params, team)


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - only its cleanup matters now
        pass
    raise ClientGone()


class Generation:
    """One engine request seen from a route: `await start()` returns the first output (or
    raises why it was refused), then `async for` gives every output; metrics are recorded."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, team: str = NO_TEAM) -> None:
        self.state = state
        self.team = team
        if state.settings.resume:
            params = seeded(params)  # a replay after an engine loss must sample the same tokens
        self._holds_slot = False
        self._done_called = False
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = uuid.uuid4().hex
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.batch_size = 0
        self._gen: AsyncIterator[RequestOutput] | None = None
        self._first: RequestOutput | None = None
        self._recorded = False

    async def start(self, overload_retry_s: float | None = None) -> RequestOutput:
        try:
            gate = self.state.gate
            if gate is not None:
                try:
                    await gate.acquire(self.team)
                except GateFull as exc:
                    self._recorded = True
                    raise EngineOverloaded(str(exc)) from None
                self._holds_slot = True
            return await self._start(overload_retry_s)
        except BaseException:
            self._done()  # whatever the route does next, the team's place is free
            raise

    async def _start(self, overload_retry_s: float | None) -> RequestOutput:
        while True:
            self._gen = Replay(lambda: self.state.engine.generate(self.request_id, self.prompt_ids, self.params),
                               self.state.resume, self.state.engine, self.state.settings.resume).stream()
            try:
                first = await self._gen.__anext__()
            except EngineOverloaded:
                if overload_retry_s:
                    await asyncio.sleep(overload_retry_s)
                    overload_retry_s = None
                    self.request_id = uuid.uuid4().hex
                    continue
                self._recorded = True  # refused, never admitted: not a finished request
                raise
            except (InvalidRequest, EngineUnavailable):
                self._recorded = True
                raise
            except EngineFailed:
                self.finish_reason = "error"
                raise
            except StopAsyncIteration:
                self.finish_reason = "error"
                raise EngineFailed("the engine ended the request without output") from None
            self._observe(first)
            self._raise_if_error(first)
            self._first = first
            return first

    @property
    def first_output(self) -> RequestOutput:
        assert self._first is not None, "call start() first"
        return self._first

    def _raise_if_error(self, out: RequestOutput) -> None:
        """A step that failed inside the engine ends its requests with finish reason `error`:
        the routes must report that as a failure, not as a normal end of text."""
        if out.finish_reason == FinishReason.ERROR:
            self.finish_reason = "error"
            raise EngineFailed(out.error or "the engine failed while running this request")

    def _observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            elif self.last_token_time is not None:
                self.state.metrics.observe_itl(now - self.last_token_time)
            self.last_token_time = now
        if out.completion_tokens > self.completion_tokens:
            self.state.quotas.add_tokens(self.team, generated=out.completion_tokens - self.completion_tokens)
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens)
        self.batch_size = max(self.batch_size, int(self.state.engine.stats.get("num_running", 0)))
        if out.queue_time_s is not None:
            self.state.metrics.observe_queue_time(out.queue_time_s)
        if out.finished:
            self.finish_reason = out.finish_reason.value if out.finish_reason else None
            self.record()

    def _done(self) -> None:
        """The generation holds no engine place any more: its team's slot and count are free."""
        if self._done_called:
            return
        self._done_called = True
        self.state.quotas.release(self.team)
        if self._holds_slot:
            self._holds_slot = False
            self.state.gate.release()

    def record(self) -> None:
        self._done()
        if self._recorded:
            return
        self._recorded = True
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        self.state.metrics.observe_request(
            prompt_tokens=len(self.prompt_ids), generation_tokens=self.completion_tokens, ttft=ttft,
            e2e=time.perf_counter() - self.arrival, finish_reason=self.finish_reason or "abort")

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        assert self._gen is not None and self._first is not None, "call start() first"
        try:
            yield self._first
            if self._first.finished:
                return
            async for out in self._gen:
                self._observe(out)
                self._raise_if_error(out)
                yield out
                if out.finished:
                    return
        finally:
            self.record()
            await self._gen.aclose()

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()
        self.record()

    def user_stats(self) -> dict[str, Any]:
        """The original's optional per-request stats object."""
        end = self.last_token_time or time.perf_counter()
        ttft = (self.first_token_time or end) - self.arrival
        decode_tokens = max(0, self.completion_tokens - 1)
        decode_time = end - (self.first_token_time or end)
        total = end - self.arrival
        return {
            "user_ttft_ms": round(ttft * 1000, 3),
            "user_tps": round(self.completion_tokens / total, 3) if total > 0 else 0.0,
            "prefill_tokens": len(self.prompt_ids),
            "prefill_tps": round(len(self.prompt_ids) / ttft, 3) if ttft > 0 else 0.0,
            "decode_tokens": decode_tokens,
            "decode_tps": round(decode_tokens / decode_time, 3) if decode_time > 0 else 0.0,
            "batch_size": self.batch_size,
            "context_length": len(self.prompt_ids) + self.completion_tokens,
        }


__all__ = ["ApiError", "ClientGone", "Generation", "ServerState", "unless_disconnected", "until_disconnect"]
