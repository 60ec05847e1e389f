"""What stands between a socket and the app: a header timeout on uvicorn's HTTP protocol, and ASGI middleware (plain
ASGI rather than BaseHTTPMiddleware, so streaming responses and disconnects pass through untouched) for a body size
and time limit (413 / 408) and a request counter for /metrics.

Without the timeouts one client can hold a connection, and the memory behind it, for as long as it likes: uvicorn
closes idle keep-alive connections, but not one that sends half a request line, or a body a byte every few seconds.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepsail.serve.metrics import ServerMetrics
from deepsail.serve.protocol import error_body


def timed_http_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all arrived within
    `header_timeout_s` of its opening (or of the previous response on a kept-alive connection)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():  # the headers are in; the body has its own limit (BodyLimit)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


class BodyLimit:
    """413 for bodies over `max_bytes`, 408 for one that has not fully arrived within `timeout_s`. The body is read
    here, bounded, and replayed to the app: a chunked upload has no Content-Length to check up front, and this way no
    handler ever sees an oversized (or endless) body."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send, 413 if declared.isdigit() else 400)
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_bytes:
                        return await self._reject(send, 413)
        except TimeoutError:
            return await self._reject(send, 408)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards only http.disconnect comes, which handlers watch for

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, status: int) -> None:
        message = {
            413: f"request body exceeds {self.max_bytes} bytes",
            408: f"request body not received within {self.timeout_s:g} s",
        }.get(status, "invalid Content-Length header")
        body = json.dumps(error_body(message, code=status)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """deepsail_requests_total{endpoint, status}. Unknown paths count as "other" so a scanner cannot blow up the
    label set."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app dies before starting a response, the server sends a 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status)).inc()
