"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, plus vLLM's
/tokenize and /detokenize. Errors are `{"error": {"message", "type", "param", "code"}}`.

Thin HTTP wrappers over serving_openai.OpenAIServing: authenticate, read the body, watch for the
client leaving, and turn the results (or ApiErrors) into responses.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llamaserve.server.errors import openai_error
from llamaserve.server.protocol import ApiError
from llamaserve.server.serving_openai import OpenAIServing
from llamaserve.server.state import ClientGone, ServerState, unless_disconnected
from llamaserve.server.streaming import DisconnectAwareStreamingResponse


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    serving = OpenAIServing(state)

    async def handle(request: Request, chat: bool) -> Response:
        try:
            team = state.team_of(state.authenticate(request))
            req = serving.parse(await state.read_body(request), chat)
            sub = await unless_disconnected(request, serving.submit(req, team))
        except ApiError as exc:
            return openai_error(exc)
        except ClientGone:
            return Response(status_code=499)
        if req.stream:
            return DisconnectAwareStreamingResponse(serving.stream(sub), media_type="text/event-stream",
                                                    headers={"Cache-Control": "no-cache"}, on_close=sub.aclose)
        try:
            return JSONResponse(await unless_disconnected(request, serving.collect(sub)))
        except ClientGone:
            return Response(status_code=499)
        except ApiError as exc:
            return openai_error(exc)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            state.authenticate(request)
        except ApiError as exc:
            return openai_error(exc)
        return JSONResponse(serving.models())

    @router.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            state.authenticate(request)
            return JSONResponse(serving.tokenize(await state.read_body(request)))
        except ApiError as exc:
            return openai_error(exc)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        try:
            state.authenticate(request)
            return JSONResponse(serving.detokenize(await state.read_body(request)))
        except ApiError as exc:
            return openai_error(exc)

    return router
