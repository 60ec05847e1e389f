"""The engine side of one HTTP request: its choices' event streams merged into one, served as SSE or collected,
and cancelled together when the client goes away.

A client that disconnects cancels its handles, which frees their KV blocks within one engine step. A watcher task
sees the disconnect even while the request is still queued and no token has been written (a write to a closed
socket would only notice after the next token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from deepsail.serve.metrics import ServerMetrics
from deepsail.serve.protocol import APIError, error_body

log = logging.getLogger("deepsail.serve")

_END = object()  # a choice's stream ended
_ABORT = object()  # the whole request was cancelled: end `events()` now


class ChoiceStreams:
    """One request's engine handles (prompts × n), their event streams merged into one, cancelled together.

    Per-choice timing feeds the latency histograms: TTFT and end-to-end from `arrival`, inter-token latency
    between consecutive events of the same choice.
    """

    def __init__(self, handles: list[Any], metrics: ServerMetrics, arrival: float) -> None:
        self.handles, self.metrics, self.arrival = handles, metrics, arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = [0] * len(handles)
        self.tasks = [asyncio.create_task(self._pump(i, h)) for i, h in enumerate(handles)]

    async def _pump(self, index: int, handle: Any) -> None:
        last = None
        try:
            async for ev in handle.stream():
                now = time.perf_counter()
                if ev.token_id is not None:
                    self.completion_tokens[index] += 1
                    self.metrics.generation_tokens.inc()
                    if last is None:
                        self.metrics.ttft.observe(now - self.arrival)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                if ev.finish_reason is not None:
                    self.metrics.e2e.observe(now - self.arrival)
                    self.metrics.finished.labels(ev.finish_reason).inc()
                    drafted = (handle.usage or {}).get("draft_tokens", 0)
                    if drafted:
                        self.metrics.spec_acceptance.observe(handle.usage["accepted_tokens"] / drafted)
                self.queue.put_nowait((index, ev))
            self.queue.put_nowait((index, _END))
        except Exception as e:  # the engine failed this request: surface it to the client, not as a hang
            log.exception("engine stream failed")
            self.queue.put_nowait((index, e))

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, event) in arrival order until every choice has finished (or `abort` was called)."""
        open_ = len(self.handles)
        while open_:
            index, item = await self.queue.get()
            if item is _END:
                open_ -= 1
            elif item is _ABORT:
                return
            elif isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", "internal_error")
            else:
                yield index, item

    def abort(self) -> None:
        """Cancel every handle (frees its KV blocks within one engine step) and end `events()`."""
        for h in self.handles:
            h.cancel()
        for t in self.tasks:
            t.cancel()
        self.queue.put_nowait((0, _ABORT))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone. After the body is read, the server's receive() only ever yields
    http.disconnect, so awaiting it costs nothing (no polling)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, streams: ChoiceStreams) -> tuple[list[list[Any]], bool]:
    """All events per choice; (events, client still connected). A disconnect aborts the generation."""
    per_choice: list[list[Any]] = [[] for _ in streams.handles]

    async def consume() -> None:
        async for i, ev in streams.events():
            per_choice[i].append(ev)

    consumer = asyncio.create_task(consume())
    watcher = asyncio.create_task(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            streams.abort()
    if consumer not in done:
        return per_choice, False
    consumer.result()  # re-raise an engine failure as its APIError
    return per_choice, True


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def sse_response(
    request: Request, streams: ChoiceStreams, chunks: Callable[[int, Any], list[dict]], tail: Callable[[], list[dict]]
) -> StreamingResponse:
    """SSE response: `chunks(i, event)` per event, then `tail()` (the usage chunk), then [DONE].

    The disconnect watcher starts now, not when the body starts iterating: a client gone before the first byte
    still cancels its handles. Whoever notices the disconnect first (the watcher, or Starlette cancelling the body)
    aborts the generation."""
    watcher = asyncio.create_task(wait_disconnect(request))
    watcher.add_done_callback(lambda t: t.cancelled() or streams.abort())

    async def body() -> AsyncIterator[str]:
        try:
            async for i, ev in streams.events():
                for c in chunks(i, ev):
                    yield sse(c)
            if watcher.done():
                return
            for c in tail():
                yield sse(c)
            yield sse("[DONE]")
        except APIError as e:  # headers are gone; an error event is what OpenAI clients understand mid-stream
            yield sse(error_body(e.message, e.type, e.param, e.code))
            yield sse("[DONE]")
        finally:
            watcher.cancel()
            streams.abort()  # no-op for finished handles; frees blocks if we stopped early

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
