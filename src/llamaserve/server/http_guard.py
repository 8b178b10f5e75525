"""uvicorn's HTTP/1.1 protocol with two limits it lacks: a deadline for the request headers and a
cap on open connections.

uvicorn only times out idle keep-alive connections; a client that opens a connection and sends
its headers a byte at a time (slowloris) keeps it forever, so a few thousand such clients hold
every file descriptor. ASGI middleware cannot help: the app only sees a request once its headers
are complete. Hence a protocol subclass, given to uvicorn with `Config(http=...)`.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 33\r\n\r\n"
         b"too many open connections; retry\n")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 39\r\n\r\n"
            b"request headers were not sent in time\n")


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 1024

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if self._waiting_for_headers():
            self._arm()  # the next request of a keep-alive connection gets the same deadline
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()  # a new request's headers are complete

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.write(_TIMEOUT)
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http` option, with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
