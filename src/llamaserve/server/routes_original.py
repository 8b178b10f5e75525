"""The original system's API (SPEC section 2), kept compatible with its clients.

POST /inference/<model>  raw text chunks, then "<|endoftext|>" (+ stats JSON + "<|endoftext|>")
POST /chat/<model>       server-sent events: `answer` with the cumulative message, then `close`
Errors are `{"message": ...}`.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llamaserve.server.errors import ENGINE_ERRORS, Api, EngineFailed, engine_error, original_error
from llamaserve.server.protocol import ApiError, parse_original
from llamaserve.server.state import ClientGone, Generation, ServerState, unless_disconnected
from llamaserve.server.streaming import DisconnectAwareStreamingResponse

END = "<|endoftext|>"
log = logging.getLogger("llamaserve.server")


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    async def prepare(request: Request, name: str) -> tuple[Generation, object] | Response:
        """The started generation and the parsed body, or the error response to send instead."""
        try:
            return await start_generation(request, name)
        except ApiError as exc:
            return original_error(exc)
        except ClientGone:
            return Response(status_code=499)

    async def start_generation(request: Request, name: str) -> tuple[Generation, object]:
        state.authenticate(request)  # first: who may not call learns nothing, not even the names
        if name not in state.served_names():
            raise ApiError(404, f"unknown model route {name!r}; this server serves "
                                f"{', '.join(sorted(state.served_names()))}")
        body = await state.read_body(request)
        req = parse_original(body)
        state.check_ready()
        try:
            ids = state.tokenizer.encode_chat([{"role": "user", "content": req.text}], add_generation_prompt=True)
        except ValueError as exc:  # e.g. Llama 2 control markers inside the text
            raise ApiError(400, f"'text': {exc}", "text") from None
        state.check_prompt_fits(len(ids))
        gen = state.generation(ids, req.params)
        try:
            await unless_disconnected(request, gen.start(overload_retry_s=state.settings.overload_backoff_s))
        except ENGINE_ERRORS as exc:
            raise engine_error(exc, Api.ORIGINAL) from None
        return gen, req

    @router.post("/inference/{name}")
    async def inference(name: str, request: Request) -> Response:
        prepared = await prepare(request, name)
        if isinstance(prepared, Response):
            return prepared
        gen, req = prepared

        async def body():
            if req.return_prompt:
                yield req.text
            try:
                async for out in gen:
                    if out.text_delta:
                        yield out.text_delta
            except EngineFailed as exc:
                # Headers are gone already: say why, then break the chunked stream so the
                # client sees an error instead of a normal end.
                yield f"\n[error: {exc}]"
                raise
            yield END
            if state.settings.send_user_stats:
                yield json.dumps(gen.user_stats())
                yield END

        return DisconnectAwareStreamingResponse(body(), media_type="text/plain; charset=utf-8",
                                                on_close=gen.aclose)

    @router.post("/chat/{name}")
    async def chat(name: str, request: Request) -> Response:
        prepared = await prepare(request, name)
        if isinstance(prepared, Response):
            return prepared
        gen, req = prepared

        def event(kind: str, data: dict) -> str:
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        async def body():
            message = req.text if req.return_prompt else ""
            try:
                async for out in gen:
                    if out.text_delta:
                        message += out.text_delta
                        yield event("answer", {"message": message})
            except EngineFailed as exc:
                yield event("error", {"message": f"the engine failed: {exc}"})
            yield event("close", {})

        return DisconnectAwareStreamingResponse(body(), media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"}, on_close=gen.aclose)

    return router
