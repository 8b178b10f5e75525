"""The original system's API (SPEC section 2), kept compatible with its clients.

POST /inference/<model>  raw text chunks, then "<|endoftext|>" (+ stats JSON + "<|endoftext|>")
POST /chat/<model>       server-sent events: `answer` with the cumulative message, then `close`
Errors are `{"message": ...}`. Thin HTTP wrappers over serving_original.OriginalServing.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llamaserve.server.errors import original_error
from llamaserve.server.protocol import ApiError
from llamaserve.server.serving_original import OriginalServing, Started
from llamaserve.server.state import ClientGone, ServerState, unless_disconnected
from llamaserve.server.streaming import DisconnectAwareStreamingResponse


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    serving = OriginalServing(state)

    async def prepare(request: Request, name: str) -> Started | Response:
        """The started generation, or the error response to send instead."""
        try:
            team = state.team_of(state.authenticate(request))  # first: who may not call learns nothing
            serving.check_route(name)
            body = await state.read_body(request)
            return await unless_disconnected(request, serving.submit(body, team))
        except ApiError as exc:
            return original_error(exc)
        except ClientGone:
            return Response(status_code=499)

    @router.post("/inference/{name}")
    async def inference(name: str, request: Request) -> Response:
        started = await prepare(request, name)
        if isinstance(started, Response):
            return started
        return DisconnectAwareStreamingResponse(serving.inference(started), media_type="text/plain; charset=utf-8",
                                                on_close=started.gen.aclose)

    @router.post("/chat/{name}")
    async def chat(name: str, request: Request) -> Response:
        started = await prepare(request, name)
        if isinstance(started, Response):
            return started
        return DisconnectAwareStreamingResponse(serving.chat(started), media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"}, on_close=started.gen.aclose)

    return router
