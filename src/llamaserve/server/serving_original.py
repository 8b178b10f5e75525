"""The original system's API (SPEC section 2) as a serving layer: parse -> submit -> stream,
without HTTP (routes_original.py wraps it). The wire format is the pure functions below.

/inference/<model>: raw text chunks, then END (then, with --send-user-stats, a JSON stats
object and END again). /chat/<model>: `answer` events with the cumulative message, then `close`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llamaserve.server.errors import ENGINE_ERRORS, Api, EngineFailed, engine_error
from llamaserve.server.protocol import ApiError, OriginalRequest, parse_original
from llamaserve.server.quotas import NO_TEAM
from llamaserve.server.state import Generation, ServerState

END = "<|endoftext|>"


def chat_event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def inference_error_chunk(exc: Exception) -> str:
    """What /inference sends when the engine fails mid-stream (the headers are gone already)."""
    return f"\n[error: {exc}]"


@dataclass
class Started:
    gen: Generation
    req: OriginalRequest


class OriginalServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def check_route(self, name: str) -> None:
        served = self.state.served_names()
        if name not in served:
            raise ApiError(404, f"unknown model route {name!r}; this server serves {', '.join(sorted(served))}")

    async def submit(self, body: bytes, team: str = NO_TEAM) -> Started:
        """Parse, encode as one user turn, and start the generation (an overloaded engine is
        retried once after a back-off, as the original's clients expect no 429)."""
        state = self.state
        req = parse_original(body)
        state.check_ready()
        try:
            ids = state.tokenizer.encode_chat([{"role": "user", "content": req.text}], add_generation_prompt=True)
        except ValueError as exc:  # e.g. Llama 2 control markers inside the text
            raise ApiError(400, f"'text': {exc}", "text") from None
        state.check_prompt_fits(len(ids))
        gen = state.generation(ids, req.params, team)
        try:
            state.admit(team, [gen], req.max_tokens_given)
            await gen.start(overload_retry_s=state.settings.overload_backoff_s)
        except ENGINE_ERRORS as exc:
            raise engine_error(exc, Api.ORIGINAL) from None
        return Started(gen, req)

    async def inference(self, started: Started) -> AsyncIterator[str]:
        """/inference's body. A failure mid-stream is said in the text, then re-raised so the
        chunked stream breaks and the client sees an error instead of a normal end."""
        gen, req = started.gen, started.req
        if req.return_prompt:
            yield req.text
        try:
            async for out in gen:
                if out.text_delta:
                    yield out.text_delta
        except EngineFailed as exc:
            yield inference_error_chunk(exc)
            raise
        yield END
        if self.state.settings.send_user_stats:
            yield json.dumps(gen.user_stats())
            yield END

    async def chat(self, started: Started) -> AsyncIterator[str]:
        """/chat's events: the whole message so far on every new text, then `close`."""
        gen, req = started.gen, started.req
        message = req.text if req.return_prompt else ""
        try:
            async for out in gen:
                if out.text_delta:
                    message += out.text_delta
                    yield chat_event("answer", {"message": message})
        except EngineFailed as exc:
            yield chat_event("error", {"message": f"the engine failed: {exc}"})
        yield chat_event("close", {})
