"""A streaming response that always releases its engine request, however the stream ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Starlette cancels the body when the client disconnects; a body that was cancelled
    before it started never runs its cleanup, so `on_close` is awaited in every case."""

    def __init__(self, content, *, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                try:
                    await self._on_close()
                except RuntimeError:
                    pass  # the body generator is still unwinding and closes it itself
