"""The HTTP server: an OpenAI-compatible FastAPI app in front of the continuous-batching `Engine`.

    app = create_app(lambda: load_served("runs/base"), ServerConfig(api_key="sk-..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `deepsail serve` does

Endpoints: /v1/completions, /v1/chat/completions (both stream as SSE), /v1/models, /generate (plain JSON),
/health (503 until the model is loaded) and /metrics (Prometheus).

How a request flows: validate (pydantic, then the checks that need the model: context length, vocabulary) ->
tokenize -> `engine.submit` one handle per choice -> merge the handles' event streams -> SSE chunks or one JSON
body. The model loads in a background thread at startup, so the port answers (503) from the first second and
orchestrators can tell "loading" from "dead". A client that goes away cancels its handles, which frees their KV
blocks within one engine step; a watcher task sees the disconnect even while the request is still queued and
no token has been written (a write to a closed socket would only notice after the next token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepsail.infer.sampling import SamplingParams
from deepsail.serve import protocol as P
from deepsail.serve.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("deepsail.serve")

MAX_CHOICES = 64  # prompts × n per request: each choice is a separate sequence in the batch


@dataclass
class ServerConfig:
    api_key: str | None = None
    model_name: str | None = None  # the id /v1/models reports; default: the model folder's name
    max_body_bytes: int = 8 << 20  # ~2M tokens of text; beyond any context we serve
    retry_after_s: int = 1  # what a 429 tells clients to wait: about one batch turnover on small models
    # engine.shutdown's bound at app shutdown. Under `deepsail serve`, uvicorn has already drained HTTP requests
    # (--drain-timeout) and cancelled the rest, so this only covers the engine's last step.
    engine_drain_s: float = 5.0


@dataclass
class Served:
    """What the loader returns: a started engine and what the endpoints need to know about its model."""

    engine: Any  # deepsail.infer.engine.Engine (or anything with its submit/stats/shutdown API)
    tokenizer: Any  # deepsail.data.tokenizer.Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int


def load_served(path: str | Path, device: str | None = None, dtype: str | None = None,
                **engine_config: Any) -> Served:
    """Load an HF dir or a run folder (its latest checkpoint) and start an engine on it. `engine_config` are
    `EngineConfig` fields; None means the engine's default."""
    from deepsail.infer.engine import Engine, EngineConfig
    from deepsail.infer.generate import load, resolve_checkpoint

    folder = resolve_checkpoint(path)
    model, tokenizer = load(folder, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer.json; the server needs one to turn text into tokens. Copy the "
                         "tokenizer the model was trained with into it")
    engine = Engine(model, tokenizer, EngineConfig(**{k: v for k, v in engine_config.items() if v is not None}))
    engine.start()
    return Served(engine, tokenizer, Path(path).resolve().name, engine.max_model_len, model.config.vocab_size)


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(P.error_body(e.message, e.type, e.param, e.status), status_code=e.status, headers=e.headers)


# --- ASGI middleware (plain ASGI, not BaseHTTPMiddleware, so streaming and disconnects pass through untouched) -------
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
        message = (f"request body exceeds {self.max_bytes} bytes" if status == 413
                   else "invalid Content-Length header")
        body = json.dumps(P.error_body(message, code=status)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
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


# --- the engine side of one request -------------------------------------------------------------------------------
_END = object()


class Generation:
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
            elif item is None:  # abort
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
        self.queue.put_nowait((0, None))


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone. After the body is read, the server's receive() only ever yields
    http.disconnect, so awaiting it costs nothing (no polling)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- app state and checks -----------------------------------------------------------------------------------------
class State:
    def __init__(self, load: Callable[[], Served], on_load_error: Callable[[BaseException], None] | None) -> None:
        self.served: Served | None = None
        self.error: str | None = None
        self._load, self._on_load_error = load, on_load_error
        self.thread = threading.Thread(target=self._run_load, name="deepsail-load", daemon=True)

    def _run_load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.served = self._load()
            log.info("model %s loaded in %.1fs; ready", self.served.model_name, time.perf_counter() - t0)
        except BaseException as e:  # reported on /health, and to the CLI, which exits
            self.error = f"{type(e).__name__}: {e}"
            if isinstance(e, ValueError):  # a user error with its own explanation: no traceback needed
                log.error("model failed to load: %s", e)
            else:
                log.exception("model failed to load")
            if self._on_load_error is not None:
                self._on_load_error(e)

    def ready(self) -> Served:
        if self.served is None:
            msg = f"model failed to load: {self.error}" if self.error else "model is loading; retry shortly"
            raise APIError(503, msg, "service_unavailable", headers={"Retry-After": "5"})
        return self.served


def sampling_params(req: P.SamplingFields, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
            min_p=req.min_p, repetition_penalty=req.repetition_penalty, stop=req.stop_list,
            stop_token_ids=req.stop_token_ids or (), ignore_eos=req.ignore_eos, logprobs=logprobs,
            # n choices with one seed must still differ from each other, and each stay reproducible.
            seed=None if req.seed is None else (req.seed + seed_offset) % (P.MAX_SEED + 1),
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _fit(served: Served, prompt_len: int, max_tokens: int | None) -> int:
    """max_tokens after checking prompt + max_tokens against the context (None = all that is left)."""
    limit = served.max_model_len
    if max_tokens is None:
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; your prompt has "
                                f"{prompt_len} tokens, which leaves no room to generate. Shorten the prompt.")
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, however you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            "completion). Shorten the prompt or lower max_tokens.", param="max_tokens")
    return max_tokens


def _check_ids(served: Served, ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "empty prompt: generation needs at least one token to condition on", param="prompt")
    bad = next((i for i in ids if i >= served.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range: the vocabulary has {served.vocab_size} ids",
                       param="prompt")


def _submit(served: Served, cfg: ServerConfig, jobs: list[tuple[list[int], SamplingParams]]) -> list[Any]:
    """Submit every choice or none: a full queue part way through cancels the ones already in."""
    from deepsail.infer.engine import EngineClosed, QueueFull

    handles: list[Any] = []
    try:
        for ids, params in jobs:
            handles.append(served.engine.submit(ids, params))
    except EngineClosed as e:
        for h in handles:
            h.cancel()
        raise APIError(503, "the server is shutting down and takes no new requests", "service_unavailable") from e
    except QueueFull as e:
        for h in handles:
            h.cancel()
        raise APIError(429, f"the server is at capacity ({e or 'request queue full'}); retry after "
                            f"{cfg.retry_after_s}s", "server_overloaded",
                       headers={"Retry-After": str(cfg.retry_after_s)}) from e
    except ValueError as e:
        for h in handles:
            h.cancel()
        raise APIError(400, str(e)) from e
    return handles


async def _collect(request: Request, gen: Generation) -> tuple[list[list[Any]], bool]:
    """All events per choice; (events, client still connected). A disconnect aborts the generation."""
    per_choice: list[list[Any]] = [[] for _ in gen.handles]

    async def consume() -> None:
        async for i, ev in gen.events():
            per_choice[i].append(ev)

    consumer = asyncio.create_task(consume())
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            gen.abort()
    if consumer not in done:
        return per_choice, False
    consumer.result()  # re-raise an engine failure as its APIError
    return per_choice, True


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(errors: Any) -> APIError:
    """pydantic's errors as one readable 400. A union field (prompt: str | list[str] | ...) fails once per member;
    those are folded into one "field: A or B" message, and the member tags are dropped from the field's path."""
    def where(err: dict) -> str:
        parts = [str(x) for x in err.get("loc", ())[1:]  # [0] is "body"
                 if isinstance(x, int) or (str(x).isidentifier() and str(x) not in _TYPE_TAGS)]
        return ".".join(parts)

    if not errors:
        return APIError(400, "invalid request")
    param = where(errors[0])
    same = [e for e in errors if where(e) == param]
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid")).removeprefix("Value error, ") for e in same))
    more = len(errors) - len(same)
    text = f"{param + ': ' if param else ''}{' or '.join(msgs)}{f' (and {more} more problems)' if more else ''}"
    return APIError(400, text, param=param or None)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(request: Request, gen: Generation, chunks: Callable[[int, Any], list[dict]],
            tail: Callable[[], list[dict]]) -> StreamingResponse:
    """SSE response: chunks per event, then `tail()` (the usage chunk), then [DONE].

    The disconnect watcher starts now, not when the body starts iterating: a client gone before the first byte
    still cancels its handles. Whoever notices the disconnect first (the watcher, or Starlette cancelling the body)
    aborts the generation."""
    watcher = asyncio.create_task(_wait_disconnect(request))
    watcher.add_done_callback(lambda t: t.cancelled() or gen.abort())

    async def body() -> AsyncIterator[str]:
        try:
            async for i, ev in gen.events():
                for c in chunks(i, ev):
                    yield _sse(c)
            if watcher.done():
                return
            for c in tail():
                yield _sse(c)
            yield _sse("[DONE]")
        except APIError as e:  # headers are gone; an error event is what OpenAI clients understand mid-stream
            yield _sse(P.error_body(e.message, e.type, e.param, e.status))
            yield _sse("[DONE]")
        finally:
            watcher.cancel()
            gen.abort()  # no-op for finished handles; frees blocks if we stopped early

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompt_tokens: int, gen: Generation) -> P.Usage:
    c = sum(gen.completion_tokens)
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=c, total_tokens=prompt_tokens + c)


# --- the app ------------------------------------------------------------------------------------------------------
def create_app(load: Callable[[], Served], config: ServerConfig | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app. `load` runs in a background thread at startup; until it returns, /health answers 503."""
    cfg = config or ServerConfig()
    state = State(load, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.thread.start()
        yield
        # uvicorn has already stopped accepting requests, waited (up to its graceful timeout) for in-flight ones
        # and cancelled the rest; the engine gets engine_drain_s to finish its last step.
        if state.served is not None:
            await asyncio.to_thread(state.served.engine.shutdown, cfg.engine_drain_s)

    app = FastAPI(title="deepsail", summary="OpenAI-compatible inference server", lifespan=lifespan)
    metrics = ServerMetrics(lambda: state.served.engine.stats() if state.served else None)
    app.state.deepsail = state

    # --- errors: always OpenAI's envelope, and 400 (not FastAPI's 422) for invalid requests ---
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
            e.status_code, "invalid_request_error")
        return _error_response(APIError(e.status_code, str(e.detail), kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", "internal_error"))

    # --- auth: every route but /health when a key is set ---
    key = cfg.api_key.encode() if cfg.api_key else None

    async def require_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        given = given[7:] if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        # compare_digest: time independent of where the first mismatch is, so the key cannot be guessed byte by
        # byte. Bytes, not str: compare_digest refuses non-ASCII str, and a header can carry any latin-1.
        if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_key)]

    # --- routes ---
    @app.get("/health", tags=["ops"], responses={503: {"model": P.ErrorResponse}})
    async def health() -> dict[str, str]:
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], dependencies=protected, response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=protected, response_model=P.ModelList)
    async def models() -> P.ModelList:
        s = state.ready()
        return P.ModelList(data=[P.ModelCard(id=cfg.model_name or s.model_name, max_model_len=s.max_model_len)])

    @app.post("/v1/completions", dependencies=protected, response_model=P.CompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 429: {"model": P.ErrorResponse}})
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        s = state.ready()
        tok = s.tokenizer
        prompts = req.prompts()
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts × n={req.n} = {len(prompts) * req.n} sequences; at most "
                                f"{MAX_CHOICES} per request", param="n")
        encoded = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts])
        jobs, prompt_tokens = [], 0
        for ids in encoded:
            _check_ids(s, ids)
            max_tokens = _fit(s, len(ids), req.max_tokens)
            prompt_tokens += len(ids)
            jobs += [(ids, sampling_params(req, max_tokens, req.logprobs, j)) for j in range(req.n)]
        metrics.prompt_tokens.inc(prompt_tokens)
        echo = [tok.decode(ids) if req.echo else "" for ids in encoded for _ in range(req.n)]
        gen = Generation(_submit(s, cfg, jobs), metrics, arrival)
        name = cfg.model_name or s.model_name
        rid, created = P.new_id("cmpl"), P.now()
        offsets = [len(e) for e in echo]  # text_offset of the next token, per choice

        def logprobs_of(i: int, evs: list[Any]) -> P.CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            out = P.CompletionLogprobs()
            for ev in evs:
                if ev.token_id is None:
                    continue
                piece = tok.decode([ev.token_id])
                out.tokens.append(piece)
                out.token_logprobs.append(ev.logprob)
                out.top_logprobs.append({tok.decode([t]): lp for t, lp in ev.top_logprobs or []} if req.logprobs
                                        else None)
                out.text_offset.append(offsets[i])
                offsets[i] += len(piece)
            return out

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [True] * len(jobs)

            def chunks(i: int, ev: Any) -> list[dict]:
                text = ev.text
                if first[i]:
                    text, first[i] = echo[i] + text, False
                if not (text or ev.finish_reason or req.logprobs is not None):
                    return []
                choice = P.CompletionChoice(index=i, text=text, logprobs=logprobs_of(i, [ev]),
                                            finish_reason=ev.finish_reason)
                return [{"id": rid, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice.model_dump()]}]

            def tail() -> list[dict]:
                if not include_usage:
                    return []
                return [{"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                         "usage": _usage(prompt_tokens, gen).model_dump()}]

            return _stream(request, gen, chunks, tail)

        per_choice, connected = await _collect(request, gen)
        if not connected:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        choices = [
            P.CompletionChoice(index=i, text=echo[i] + "".join(ev.text for ev in evs), logprobs=logprobs_of(i, evs),
                               finish_reason=next((ev.finish_reason for ev in reversed(evs) if ev.finish_reason), None))
            for i, evs in enumerate(per_choice)
        ]
        return P.CompletionResponse(id=rid, created=created, model=name, choices=choices,
                                    usage=_usage(prompt_tokens, gen))

    @app.post("/v1/chat/completions", dependencies=protected, response_model=P.ChatCompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 429: {"model": P.ErrorResponse}})
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        s = state.ready()
        tok = s.tokenizer

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(req.template_messages(),
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as e:  # a template's raise_exception (bad role order...) is the client's error
                raise APIError(400, f"chat template rejected the messages: {e}", param="messages") from e
            return tok.encode(text)

        ids = await asyncio.to_thread(render)
        _check_ids(s, ids)
        max_tokens = _fit(s, len(ids), req.max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, sampling_params(req, max_tokens, logprobs, j)) for j in range(req.n)]
        metrics.prompt_tokens.inc(len(ids))
        gen = Generation(_submit(s, cfg, jobs), metrics, arrival)
        name = cfg.model_name or s.model_name
        rid, created = P.new_id("chatcmpl"), P.now()

        def logprobs_of(evs: list[Any]) -> P.ChoiceLogprobs | None:
            if not req.logprobs:
                return None
            content = []
            for ev in evs:
                if ev.token_id is None:
                    continue
                piece = tok.decode([ev.token_id])
                top = [P.TopLogprob(token=(t_ := tok.decode([t])), logprob=lp, bytes=list(t_.encode()))
                       for t, lp in (ev.top_logprobs or [])]
                content.append(P.TokenLogprob(token=piece, logprob=ev.logprob, bytes=list(piece.encode()),
                                              top_logprobs=top))
            return P.ChoiceLogprobs(content=content)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [True] * req.n

            def chunk(choices: list[dict], usage: P.Usage | None = None) -> dict:
                c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": choices}
                return c | {"usage": usage.model_dump()} if usage else c

            def chunks(i: int, ev: Any) -> list[dict]:
                out = []
                if first[i]:  # OpenAI opens every choice with a role-only delta
                    first[i] = False
                    out.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]))
                if ev.text or ev.finish_reason or req.logprobs:
                    lp = logprobs_of([ev])
                    out.append(chunk([{"index": i, "delta": {"content": ev.text} if ev.text else {},
                                       "logprobs": lp.model_dump() if lp else None,
                                       "finish_reason": ev.finish_reason}]))
                return out

            def tail() -> list[dict]:
                return [chunk([], _usage(len(ids), gen))] if include_usage else []

            return _stream(request, gen, chunks, tail)

        per_choice, connected = await _collect(request, gen)
        if not connected:
            return Response(status_code=499)
        choices = [
            P.ChatChoice(index=i, message=P.AssistantMessage(content="".join(ev.text for ev in evs)),
                         logprobs=logprobs_of(evs),
                         finish_reason=next((ev.finish_reason for ev in reversed(evs) if ev.finish_reason), None))
            for i, evs in enumerate(per_choice)
        ]
        return P.ChatCompletionResponse(id=rid, created=created, model=name, choices=choices,
                                        usage=_usage(len(ids), gen))

    @app.post("/generate", dependencies=protected, response_model=P.GenerateResponse,
              responses={400: {"model": P.ErrorResponse}, 429: {"model": P.ErrorResponse}})
    async def generate(req: P.GenerateRequest, request: Request) -> Any:
        """Plain text in, text out: {"prompt": "...", "max_tokens": 64, "temperature": 0} -> {"text": ...}."""
        arrival = time.perf_counter()
        s = state.ready()
        ids = await asyncio.to_thread(s.tokenizer.encode, req.prompt)
        _check_ids(s, ids)
        params = sampling_params(req, _fit(s, len(ids), req.max_tokens), None, 0)
        metrics.prompt_tokens.inc(len(ids))
        gen = Generation(_submit(s, cfg, [(ids, params)]), metrics, arrival)
        (evs,), connected = await _collect(request, gen)
        if not connected:
            return Response(status_code=499)
        finish = next((ev.finish_reason for ev in reversed(evs) if ev.finish_reason), None)
        return P.GenerateResponse(text="".join(ev.text for ev in evs), finish_reason=finish,
                                  usage=_usage(len(ids), gen))

    # Outermost first: count every request (413s included), then bound the body.
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app
