"""Why a request failed, once for both APIs: the engine-side exceptions, what each becomes as an
ApiError (status, message, OpenAI type/code), and the two wire formats of an ApiError.

The original API says `{"message": ...}` and answers an overloaded engine with 503 (its clients
back off on it); the OpenAI API says `{"error": {message, type, param, code}}` and answers 429
with Retry-After, as OpenAI's own rate limit does.
"""

from __future__ import annotations

import enum
import json

from fastapi.responses import JSONResponse

from llamaserve.engine.request import InvalidRequest
from llamaserve.server.protocol import ApiError
from llamaserve.server.quotas import QuotaExceeded

OVERLOADED = "Service overloaded, try again later."


class EngineOverloaded(Exception):
    """The engine's waiting queue is full."""


class EngineUnavailable(Exception):
    """The engine is loading or restarting; try again shortly."""


class EngineFailed(Exception):
    """The engine died or hung while the request was running, or its step failed."""


class EngineLost(EngineFailed):
    """The engine process was lost (crashed, killed, hung) with the request in flight; `crash`
    numbers the loss, so the requests lost together can be told apart (server/resume.py)."""

    def __init__(self, reason: str, crash: int) -> None:
        super().__init__(reason)
        self.crash = crash


ENGINE_ERRORS = (EngineOverloaded, EngineUnavailable, EngineFailed, InvalidRequest, QuotaExceeded)


class Api(enum.Enum):
    ORIGINAL = "original"
    OPENAI = "openai"


def engine_error(exc: Exception, api: Api) -> ApiError:
    """The answer to an engine-side failure of a request."""
    if isinstance(exc, EngineOverloaded):
        if api is Api.ORIGINAL:
            return ApiError(503, OVERLOADED, headers={"Retry-After": "1"})
        return ApiError(429, OVERLOADED, type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, str(exc), type="server_error", code="engine_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, QuotaExceeded):
        if exc.retry_after is None:  # waiting cannot help (max_tokens over the team's limit)
            return ApiError(400, str(exc), exc.param, code="quota_exceeded")
        retry = {"Retry-After": exc.retry_after_header}
        if api is Api.ORIGINAL:
            return ApiError(503, str(exc), headers=retry)
        return ApiError(429, str(exc), type="rate_limit_error", code="quota_exceeded", headers=retry)
    return ApiError(500, f"the engine failed: {exc}", type="server_error", code="engine_failed")


def openai_error_body(exc: ApiError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def openai_error(exc: ApiError) -> JSONResponse:
    return JSONResponse(openai_error_body(exc), status_code=exc.status, headers=exc.headers)


def openai_stream_error(exc: Exception) -> str:
    """The server-sent event that ends an OpenAI stream whose engine request failed."""
    err = engine_error(exc, Api.OPENAI)
    body = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
    return f"data: {json.dumps(body)}\n\n"


def original_error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)
