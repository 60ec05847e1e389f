"""ASGI middleware, plain ASGI rather than BaseHTTPMiddleware, so streaming responses and disconnects pass through
untouched: a body-size limit (413) and a request counter for /metrics."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepsail.serve.metrics import ServerMetrics
from deepsail.serve.protocol import error_body


class BodyLimit:
    """413 for bodies over `max_bytes`. The body is read here, bounded, and replayed to the app: a chunked upload
    has no Content-Length to check up front, and this way no handler ever sees an oversized body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send, 413 if declared.isdigit() else 400)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reject(send, 413)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards only http.disconnect comes, which handlers watch for

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, status: int) -> None:
        message = f"request body exceeds {self.max_bytes} bytes" if status == 413 else "invalid Content-Length header"
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
