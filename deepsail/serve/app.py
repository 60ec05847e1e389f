"""The HTTP server: an OpenAI-compatible FastAPI app in front of the continuous-batching `Engine`.

    app = create_app(lambda: load_served("runs/base"), ServerConfig(api_key="sk-..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `deepsail serve` does

This file is the app itself: its lifespan (the model loads in a background thread at startup, so the port answers
503 from the first second and orchestrators can tell "loading" from "dead"), API-key auth, and the mapping of every
error to OpenAI's error body. The endpoints are in `openai.py`, stream plumbing in `streams.py`, ASGI middleware
in `middleware.py`.

Endpoints: /v1/completions, /v1/chat/completions (both stream as SSE), /v1/models, /generate (plain JSON),
/health (503 until the model is loaded), /metrics (Prometheus), and the web chat page at / (`web.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepsail.errors import explain
from deepsail.serve import protocol as P
from deepsail.serve.metrics import CONTENT_TYPE, ServerMetrics
from deepsail.serve.middleware import BodyLimit, CountRequests
from deepsail.serve.openai import add_routes
from deepsail.serve.protocol import APIError
from deepsail.serve.route import (
    AUTO,
    CLOUD,
    DEFAULT_CLOUD_SHARE,
    DEFAULT_LENGTH_WEIGHT,
    EDGE,
    TARGETS,
    Engines,
    Router,
    calibrate,
    held_out_prompts,
)
from deepsail.serve.web import add_web_routes

log = logging.getLogger("deepsail.serve")


@dataclass
class ServerConfig:
    api_key: str | None = None
    model_name: str | None = None  # the id /v1/models reports; default: the model folder's name
    max_body_bytes: int = 8 << 20  # ~2M tokens of text; beyond any context we serve
    retry_after_s: int = 1  # what a 429 tells clients to wait: about one batch turnover on small models
    # engine.shutdown's bound at app shutdown. Under `deepsail serve`, uvicorn has already drained HTTP requests
    # (--drain-timeout) and cancelled the rest, so this only covers the engine's last step.
    engine_drain_s: float = 5.0
    # Slow clients may not hold a connection for free: the request line and headers must arrive within
    # header_timeout_s of connecting (or of the previous response), the whole body within body_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_concurrent_tokenize: int = 2  # tokenizer threads at once (the engine needs the cores)


@dataclass
class Served:
    """What the loader returns: a started engine and what the endpoints need to know about its model."""

    engine: Any  # deepsail.infer.engine.Engine (or anything with its submit/stats/shutdown API)
    tokenizer: Any  # deepsail.data.tokenizer.Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    max_token_bytes: int = 64  # the most bytes of text one token stands for (Tokenizer.max_token_bytes)
    adapters: tuple[str, ...] = ()  # LoRA adapters a request may name as its `model`
    router: Any = None  # serve.route.Router when serving edge + cloud (`engine` is then both, for metrics/shutdown)
    # A captioner's image prefix (multimodal/connector.py ImagePrefix, on the engine's device and dtype) and the
    # placeholder id its prompts hold; None for a model that takes no images.
    image_prefix: Any = None
    image_token_id: int | None = None


def load_served(
    path: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    adapters: dict[str, str | Path] | None = None,
    **engine_config: Any,
) -> Served:
    """Load an HF dir or a run folder (its latest checkpoint) and start an engine on it, with the named LoRA
    `adapters` (peft format) served beside the base in the same batches. A captioner's folder (`deepsail mm train
    --task caption`: a decoder plus mm_config.json) also takes images in chat requests. `engine_config` are
    `EngineConfig` fields; None means the engine's default."""
    from deepsail.infer.engine import Engine, EngineConfig
    from deepsail.infer.generate import load
    from deepsail.multimodal.models import load_image_prefix
    from deepsail.train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(path)
    model, tokenizer = load(folder, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(
            f"{folder} has no tokenizer.json; the server needs one to turn text into tokens. Copy the "
            "tokenizer the model was trained with into it"
        )
    adapter_set = None
    if adapters and Path(path).resolve().name in adapters:
        raise ValueError(
            f"adapter name {Path(path).resolve().name!r} is the base model's own name; give the adapter another name."
        )
    if adapters:
        from deepsail.tune.lora import AdapterSet

        adapter_set = AdapterSet(model, adapters)
    # The decoder's first weight says where `load` put it (device, dtype resolved from "auto"); the image tokens
    # must arrive in the same dtype the engine feeds its embeddings in.
    weight = next(model.parameters())
    image = load_image_prefix(folder, weight.device)
    prefix, image_token_id = (image[0].to(weight.dtype), image[1]) if image is not None else (None, None)
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(**{k: v for k, v in engine_config.items() if v is not None}, image_token_id=image_token_id),
        adapters=adapter_set,
    )
    engine.start()
    return Served(
        engine,
        tokenizer,
        Path(path).resolve().name,
        engine.max_model_len,
        model.config.vocab_size,
        tokenizer.max_token_bytes,
        tuple(adapter_set.names) if adapter_set else (),
        image_prefix=prefix,
        image_token_id=image_token_id,
    )


def load_routed(
    routes: dict[str, str | Path],
    cloud_share: float = DEFAULT_CLOUD_SHARE,
    threshold: float | None = None,
    length_weight: float = DEFAULT_LENGTH_WEIGHT,
    calibration: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    **engine_config: Any,
) -> Any:
    """Load the edge and cloud models (each with its own engine) and calibrate the router; returns the app's
    `Served`, whose `router` holds both. `calibration`: held-out prompt texts (default: 64 from the embedded
    corpus's validation split)."""
    if set(routes) != set(TARGETS):
        raise ValueError(f"routing needs exactly edge and cloud models, got {sorted(routes)}")
    loaded: dict[str, Any] = {}
    try:
        for name in TARGETS:
            loaded[name] = load_served(routes[name], device=device, dtype=dtype, **engine_config)
        edge, cloud = loaded[EDGE], loaded[CLOUD]
        if edge.tokenizer.sha256 != cloud.tokenizer.sha256 or edge.vocab_size != cloud.vocab_size:
            raise ValueError(
                f"edge ({routes[EDGE]}) and cloud ({routes[CLOUD]}) have different tokenizers or vocabularies; "
                "routing sends one tokenized prompt to either, so they need the same one (a quantized or distilled "
                "copy of the cloud model keeps its tokenizer)"
            )
        router = Router(edge, cloud, 0.0, length_weight, cloud_share)
        if threshold is None:
            prompts = list(calibration) if calibration is not None else held_out_prompts(64)
            limit = min(edge.max_model_len, cloud.max_model_len) - 1
            scores = [router.estimate_blocking(edge.tokenizer.encode(p)[:limit] or [0]) for p in prompts]
            threshold = calibrate(scores, cloud_share)
        router.threshold = threshold
    except BaseException:
        for served in loaded.values():
            served.engine.shutdown(0)
        raise
    return Served(
        Engines(router),
        cloud.tokenizer,
        AUTO,
        min(edge.max_model_len, cloud.max_model_len),
        cloud.vocab_size,
        max(edge.max_token_bytes, cloud.max_token_bytes),
        router=router,
    )


def uvicorn_config(app: FastAPI, cfg: ServerConfig | None = None, **kwargs: Any) -> Any:
    """uvicorn's Config for this app, with the header timeout (`middleware.timed_http_protocol`) uvicorn lacks."""
    import uvicorn

    from deepsail.serve.middleware import timed_http_protocol

    cfg = cfg or ServerConfig()
    return uvicorn.Config(app, http=timed_http_protocol(cfg.header_timeout_s), **kwargs)


def check_api_key(api_key: str | None, headers: Mapping[str, str]) -> None:
    """Raise a 401 APIError unless `headers` (lower-case names) carry `api_key` as 'Authorization: Bearer KEY' or
    'X-API-Key: KEY'; no key configured lets everything through. Apps mounted in front of deepsail's reuse it."""
    if not api_key:
        return
    given = headers.get("authorization", "")
    given = given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
    # compare_digest: time independent of where the first mismatch is, so the key cannot be guessed byte by
    # byte. Bytes, not str: compare_digest refuses non-ASCII str, and a header can carry any latin-1.
    if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), api_key.encode()):
        raise APIError(
            401,
            "invalid or missing API key (send 'Authorization: Bearer <key>')",
            "authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(P.error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


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
            explained = explain(e)
            self.error = explained or f"{type(e).__name__}: {e}"
            if self._on_load_error is not None:
                self._on_load_error(e)  # the CLI reports it, through its one error path
            elif explained is not None:  # a user error with its own explanation: no traceback needed
                log.error("model failed to load: %s", explained)
            else:
                log.exception("model failed to load")

    def ready(self) -> Served:
        if self.served is None:
            msg = f"model failed to load: {self.error}" if self.error else "model is loading; retry shortly"
            raise APIError(503, msg, "service_unavailable", headers={"Retry-After": "5"})
        return self.served


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(errors: Any) -> APIError:
    """pydantic's errors as one readable 400. A union field (prompt: str | list[str] | ...) fails once per member;
    those are folded into one "field: A or B" message, and the member tags are dropped from the field's path."""

    def where(err: dict) -> str:
        parts = [
            str(x)
            for x in err.get("loc", ())[1:]  # [0] is "body"
            if isinstance(x, int) or (str(x).isidentifier() and str(x) not in _TYPE_TAGS)
        ]
        return ".".join(parts)

    if not errors:
        return APIError(400, "invalid request")
    if errors[0].get("type") == "json_invalid":  # FastAPI reports the character offset as the "field"
        loc, why = errors[0].get("loc", ()), (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return APIError(400, f"the request body is not valid JSON: {why}{at}")
    # A value of the right type but a wrong value ("is not valid Unicode") says more than the "should be a list" of
    # the union's other members: those errors go first.
    errors = sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))
    param = where(errors[0])
    same = [e for e in errors if where(e) == param]
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid")).removeprefix("Value error, ") for e in same))
    more = len(errors) - len(same)
    text = f"{param + ': ' if param else ''}{' or '.join(msgs)}{f' (and {more} more problems)' if more else ''}"
    return APIError(400, text, param=param or None)


# --- the app ------------------------------------------------------------------------------------------------------
def create_app(
    load: Callable[[], Served],
    config: ServerConfig | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
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

    # The schema and its doc pages are served by the routes below, behind the API key like everything but /health.
    app = FastAPI(
        title="deepsail",
        summary="OpenAI-compatible inference server",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
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
            e.status_code, "invalid_request_error"
        )
        return _error_response(APIError(e.status_code, str(e.detail), kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", "internal_error"))

    # --- auth: every route but /health when a key is set ---
    async def require_key(request: Request) -> None:
        check_api_key(cfg.api_key, request.headers)

    protected = [Depends(require_key)]

    # --- routes ---
    @app.get("/health", tags=["ops"], responses={503: {"model": P.ErrorResponse}})
    async def health() -> dict[str, str]:
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], dependencies=protected, response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=protected)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="deepsail API")

    @app.get("/redoc", include_in_schema=False, dependencies=protected)
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title="deepsail API")

    add_routes(app, state, cfg, metrics, protected)
    add_web_routes(app)

    # Outermost first: count every request (413s included), then bound the body.
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app
