"""The FastAPI application: routes of both APIs, health, status, metrics, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llamaserve.server import routes_openai, routes_original, routes_tokenizer
from llamaserve.server.auth import Authenticator
from llamaserve.server.engine_client import EngineClient
from llamaserve.server.engine_protocol import EngineState
from llamaserve.server.metrics import CONTENT_TYPE_LATEST
from llamaserve.server.protocol import ApiError
from llamaserve.server.settings import ServerSettings
from llamaserve.server.state import ServerState



class RequestCounter:
    """Counts every HTTP answer by route template and status (path parameters folded in)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.state.metrics.http_requests.labels(path, scope.get("method", ""), str(status["code"])).inc()


def create_app(
    settings: ServerSettings, log_file: str | None = None, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """`on_fatal(reason)` is called when the model can never load (the server should exit)."""
    authenticator = None
    if settings.auth_enabled:
        if not settings.jwt_secret:
            raise ValueError("auth is enabled but no JWT secret is set (serve generates one; pass --no-auth to opt out)")
        authenticator = Authenticator(settings.jwt_secret, settings.required_claims)

    state: ServerState
    # on_ready runs on the supervisor thread before the engine is marked ready.
    engine = EngineClient(settings.engine, engine_timeout_s=settings.engine_timeout_s,
                          hang_timeout_s=settings.hang_timeout_s,
                          on_ready=lambda info: state.engine_ready(info), on_fatal=on_fatal,
                          log_level=settings.log_level, log_file=log_file)
    state = ServerState(settings, engine, authenticator)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.quotas.enabled:
            import signal

            # `kill -HUP` re-reads the quota file (it is also re-read when it changes).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, state.quotas.reload)
        await engine.start()
        try:
            yield
        finally:
            state.draining = True
            await engine.shutdown()

    app = FastAPI(title="llamaserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llamaserve = state
    _add_service_routes(app, state)
    app.include_router(routes_original.build_router(state))
    app.include_router(routes_openai.build_router(state))
    app.include_router(routes_tokenizer.build_router(state))
    app.add_middleware(RequestCounter, state=state)
    return app


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    """/health (and /), /status, /metrics."""
    engine = state.engine

    def health_response() -> Response:
        if engine.ready and state.tokenizer is not None and not state.draining:
            return PlainTextResponse("OK")
        why = "shutting down" if state.draining else f"engine {engine.status_text}"
        if engine.last_error and engine.state != EngineState.READY:
            why += f": {engine.last_error}"
        body: dict[str, Any] = {"message": why}
        loading = engine.loading_progress  # what the load is doing and how far along
        if loading and not state.draining and engine.state == EngineState.LOADING:
            body["message"] += f": {loading['text']}"
            body["progress"] = loading
        return JSONResponse(body, status_code=503)

    @app.get("/health")
    async def health() -> Response:
        return health_response()

    @app.get("/")
    async def root() -> Response:
        return health_response()

    @app.get("/status")
    async def status(request: Request) -> Response:
        # Engine pid and last error are internals: only for token holders.
        try:
            state.authenticate(request)
        except ApiError as exc:
            return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)
        return JSONResponse({
            "engine_state": engine.state,
            "engine_pid": engine.pid,
            "engine_restarts": engine.restarts,
            "last_error": engine.last_error,
            "in_flight": engine.num_in_flight,
            "model": state.model_name,
            "route": f"/inference/{state.route_name}",
            **{k: v for k, v in engine.stats.items() if isinstance(v, (int, float, str, bool))},
        })

    @app.get("/usage")
    async def usage(request: Request) -> Response:
        """Per-team usage and limits: only for tokens with an admin claim."""
        try:
            claims = state.authenticate(request)
        except ApiError as exc:
            return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)
        if not (claims or {}).get("admin") is True:
            return JSONResponse({"message": "usage needs a token with the claim \"admin\": true"}, status_code=403)
        return JSONResponse(state.quotas.report())

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(engine.stats, engine.ready, engine.restarts)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
