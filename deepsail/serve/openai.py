"""The generation endpoints: OpenAI's /v1/completions and /v1/chat/completions, /v1/models, and a plain /generate.

How a request flows: validate (pydantic, in `protocol.py`, then the checks that need the model: context length,
vocabulary) -> tokenize off the event loop -> `engine.submit` one handle per choice -> merge the handles' event
streams (`streams.ChoiceStreams`) -> SSE chunks or one JSON body. The two OpenAI endpoints differ only in how a
prompt is made (text or token ids vs a chat template) and how a token is written out (`text` vs `delta`, their
logprob layouts); the stream / collect / usage path is one (`_respond`).

Images (a captioner's server, `Served.image_prefix`): a chat's image parts are decoded from their data: URLs and
run through the image prefix in one batch off the event loop; each image's one placeholder id in the templated
prompt becomes `num_tokens` of them, whose embeddings the engine fills with the image's tokens at prefill. The
placeholder counts toward prompt_tokens, as vLLM counts it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from deepsail.infer.sampling import SamplingParams
from deepsail.infer.structured import compile_schema
from deepsail.multimodal.connector import expand_image_tokens
from deepsail.serve import protocol as P
from deepsail.serve.metrics import ServerMetrics
from deepsail.serve.protocol import APIError
from deepsail.serve.route import AUTO, EDGE, TARGETS, RouteChoice, scoring_params
from deepsail.serve.streams import ChoiceStreams, collect, sse_response

# `Served`, `ServerConfig` and the app's `State` are defined in app.py, which imports this module to add the routes;
# here they are only read (served.engine / .tokenizer / .max_model_len / .vocab_size, cfg.model_name ...).
Served = ServerConfig = State = Any

MAX_CHOICES = 64  # prompts × n per request: each choice is a separate sequence in the batch


# --- turning a request into engine jobs ------------------------------------------------------------------------------
def sampling_params(
    req: P.SamplingFields, max_tokens: int, logprobs: int | None, seed_offset: int, prompt_logprobs: int | None = None
) -> SamplingParams:
    if req.json_schema is not None:
        try:
            compile_schema(req.json_schema)  # cached: the n choices and a client's repeated schema compile once
        except ValueError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from e
    try:
        return SamplingParams(
            prompt_logprobs=prompt_logprobs,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=max(req.top_k, 0),
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop_list,
            stop_token_ids=req.stop_token_ids or (),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            json_schema=req.json_schema,
            # n choices with one seed must still differ from each other, and each stay reproducible.
            seed=None if req.seed is None else (req.seed + seed_offset) % (P.MAX_SEED + 1),
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e


def fit(served: Served, prompt_len: int, max_tokens: int | None) -> int:
    """max_tokens after checking prompt + max_tokens against the context (None = all that is left)."""
    limit = served.max_model_len
    if max_tokens is None:
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; your prompt has "
                f"{prompt_len} tokens, which leaves no room to generate. Shorten the prompt.",
            )
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, however you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )
    return max_tokens


def check_model(served: Served, cfg: ServerConfig, requested: str | None) -> tuple[str, str | None]:
    """(the model id to answer as, the adapter to run: None for the base). A request names the base model or one
    of its adapters (`deepsail serve BASE --adapter finance=DIR`); anything else is a 404 (as vLLM): silently
    answering with another model is wrong output."""
    if served.router is not None:  # edge/cloud routing: "auto" (the default) lets the router choose
        if requested is None or requested in (AUTO, *TARGETS):
            return requested or AUTO, None
        names = [AUTO, *TARGETS]
    else:
        name = cfg.model_name or served.model_name
        if requested is None or requested == name:
            return name, None
        if requested in served.adapters:
            return requested, requested
        names = [name, *served.adapters]
    known = ", ".join(f"`{n}`" for n in names)
    raise APIError(
        404,
        f"The model `{requested}` does not exist; this server serves {known} (see /v1/models).",
        "not_found_error",
        param="model",
        code="model_not_found",
    )


def check_text_size(served: Served, text_bytes: int, param: str) -> None:
    """Refuse text that cannot fit the context before spending any time tokenizing it: no token stands for more
    than `max_token_bytes` bytes, so a text longer than context x that many bytes is too long whatever it says."""
    limit = served.max_model_len * served.max_token_bytes
    if text_bytes > limit:
        raise APIError(
            400,
            f"{param} is {text_bytes:,} bytes; this model's context of {served.max_model_len} tokens "
            f"holds at most {limit:,} bytes of text. Shorten it.",
            param=param,
        )


def check_ids(served: Served, ids: list[int], images: int = 0, param: str = "prompt") -> None:
    """Refuse ids the model cannot take: none, out of the vocabulary, or image placeholders that are not the
    `images` the request sends (the placeholder typed as text, or sent as a token id, would make the engine read
    another image's tokens or none)."""
    if not ids:
        raise APIError(400, "empty prompt: generation needs at least one token to condition on", param=param)
    bad = next((i for i in ids if i >= served.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range: the vocabulary has {served.vocab_size} ids", param=param)
    image_id = served.image_token_id
    found = 0 if image_id is None else ids.count(image_id)
    if found != images:
        placeholder = served.tokenizer.id_to_token(image_id)
        raise APIError(
            400,
            f"the prompt holds {found} image placeholders ({placeholder!r}, token id {image_id}) for the {images} "
            f"image(s) the request sends: {placeholder!r} cannot be typed as text or sent as a token id. Send each "
            'image as a {"type": "image_url"} part of a /v1/chat/completions message',
            param=param,
        )


def check_takes_images(served: Served, images: list[tuple[str, P.ImageURL]]) -> None:
    if images and served.image_prefix is None:
        raise APIError(
            400,
            f"this model takes no images: {images[0][0]} is an image part, but the served model has no image "
            "encoder (no mm_config.json in its folder). Serve an image-captioning model, trained with `deepsail mm "
            "train --task caption`, or send text only",
            param=images[0][0],
        )


def image_tokens(served: Served, images: list[tuple[str, P.ImageURL]]) -> torch.Tensor:
    """The images' tokens, [images x num_tokens, hidden] in reading order: each data: URL decoded and squashed to
    the prefix's resolution, then all of them through the vision encoder and connector in one batch. Blocking:
    call it in a worker thread."""
    from deepsail.multimodal.images import decode_data_url, load_image, to_tensor

    prefix = served.image_prefix
    size = prefix.vision.config.image_size
    pixels = []
    for where, image in images:
        try:
            pixels.append(load_image(decode_data_url(image.url), size))
        except ValueError as e:  # the client's image: bad URL, base64, bytes, pixel format or size
            raise APIError(400, f"{where}: {e}", param=f"{where}.image_url.url") from e
    weight = next(prefix.parameters())
    with torch.inference_mode():
        tokens_BND = prefix(to_tensor(np.stack(pixels)).to(weight.device, weight.dtype))
    return tokens_BND.reshape(-1, tokens_BND.shape[-1])


def submit(
    served: Served,
    cfg: ServerConfig,
    jobs: list[tuple[list[int], SamplingParams]],
    adapter: str | None = None,
    route: RouteChoice | None = None,
    image_embeds: torch.Tensor | None = None,
) -> list[Any]:
    """Submit every choice or none: a full queue part way through cancels the ones already in. With `route`, to
    that target's engine. `image_embeds` (the prompts' image tokens) go with every choice."""
    from deepsail.infer.engine import EngineClosed, QueueFull

    engine = served.engine if route is None else served.router.targets[route.target].engine
    handles: list[Any] = []
    try:
        for ids, params in jobs:
            handles.append(engine.submit(ids, params, adapter, image_embeds=image_embeds))
    except EngineClosed as e:
        for h in handles:
            h.cancel()
        raise APIError(503, "the server is shutting down and takes no new requests", "service_unavailable") from e
    except QueueFull as e:
        for h in handles:
            h.cancel()
        raise APIError(
            429,
            f"the server is at capacity ({e or 'request queue full'}); retry after {cfg.retry_after_s}s",
            "server_overloaded",
            headers={"Retry-After": str(cfg.retry_after_s)},
        ) from e
    except ValueError as e:
        for h in handles:
            h.cancel()
        raise APIError(400, str(e)) from e
    return handles


async def choose_route(
    served: Served, cfg: ServerConfig, metrics: ServerMetrics, requested: str, prompts: list[list[int]]
) -> RouteChoice | None:
    """Where a routed request runs (None when the server does not route). "auto": the edge scores every prompt
    (one batched prefill each) and the hardest decides; a named target is taken as asked."""
    router = served.router
    if router is None:
        return None
    if requested != AUTO:
        choice = RouteChoice(requested, "explicit")
    else:
        t0 = time.perf_counter()
        handles = submit(served, cfg, [(ids, scoring_params()) for ids in prompts], route=RouteChoice(EDGE, AUTO))
        try:
            for h in handles:
                async for _ in h.stream():
                    pass
        finally:
            for h in handles:
                if not h.done:
                    h.cancel()  # the client went away (or the edge failed) while we waited
        elapsed = time.perf_counter() - t0
        choice = max(
            (router.decide(h.prompt_entropy, len(ids), elapsed) for h, ids in zip(handles, prompts)),
            key=lambda c: c.difficulty,
        )
        metrics.route_difficulty.observe(choice.difficulty)
    metrics.route_requests.labels(choice.target, choice.mode).inc()
    return choice


# --- writing results out ---------------------------------------------------------------------------------------------
def token_logprobs(tok: Any, evs: list[Any]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(token text, logprob, [(top token text, logprob)]) per generated token: what both endpoints report."""
    return [
        (tok.decode([ev.token_id]), ev.logprob, [(tok.decode([t]), lp) for t, lp in ev.top_logprobs or []])
        for ev in evs
        if ev.token_id is not None
    ]


def prompt_token_logprobs(tok: Any, ids: list[int], scored: list | None) -> list[tuple[str, Any, Any]]:
    """The same per prompt token (echo with logprobs): the first has no logprob, as OpenAI and vLLM report it."""
    out = []
    for i, entry in zip(ids, scored or [None] * len(ids)):
        lp, top = entry if entry is not None else (None, None)
        out.append((tok.decode([i]), lp, None if top is None else [(tok.decode([t]), v) for t, v in top]))
    return out


def chat_ids(tok: Any, messages: list[P.ChatMessage], add_generation_prompt: bool) -> list[int]:
    """The prompt ids of a chat: its messages through the model's chat template."""
    try:
        text = tok.apply_chat_template(P.template_messages(messages), add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template's raise_exception (bad role order...) is the client's error
        raise APIError(400, f"chat template rejected the messages: {e}", param="messages") from e
    return tok.encode(text)


def finish_reason(evs: list[Any]) -> str | None:
    return next((ev.finish_reason for ev in reversed(evs) if ev.finish_reason), None)


def usage(prompt_tokens: int, streams: ChoiceStreams) -> P.Usage:
    c = sum(streams.completion_tokens)
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=c, total_tokens=prompt_tokens + c)


async def _respond(
    request: Request,
    req: P.SamplingFields,
    streams: ChoiceStreams,
    head: dict[str, Any],
    prompt_tokens: int,
    chunks: Callable[[int, Any], list[dict]],
    body: Callable[[list[list[Any]]], Any],
    route: RouteChoice | None = None,
) -> Any:
    """The one stream / collect path: SSE of `chunks` (then, when asked, a usage chunk under the same `head`: id,
    object, created, model), or `body` of all events. A routed request says where it ran in a header too."""
    headers = {"X-Deepsail-Route": route.header()} if route is not None else {}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def tail() -> list[dict]:
            return (
                [head | {"choices": [], "usage": usage(prompt_tokens, streams).model_dump()}] if include_usage else []
            )

        response = sse_response(request, streams, chunks, tail)
        response.headers.update(headers)
        return response
    per_choice, connected = await collect(request, streams)
    if not connected:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    result = body(per_choice)
    if not headers:
        return result
    return JSONResponse(jsonable_encoder(result), headers=headers)


# --- the routes -------------------------------------------------------------------------------------------------------
def add_routes(app: FastAPI, state: State, cfg: ServerConfig, metrics: ServerMetrics, protected: list[Any]) -> None:
    errors = {400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}, 429: {"model": P.ErrorResponse}}
    # Tokenizing runs in worker threads, a few at a time: a burst of big prompts queues here instead of taking every
    # core from the engine (the size check above already refused any text that cannot fit the context).
    tokenizing = asyncio.Semaphore(cfg.max_concurrent_tokenize)

    async def tokenize(fn: Callable[[], Any]) -> Any:
        async with tokenizing:
            return await asyncio.to_thread(fn)

    def model_name(s: Served) -> str:
        return cfg.model_name or s.model_name

    @app.get("/v1/models", dependencies=protected, response_model=P.ModelList)
    async def models() -> P.ModelList:
        s = state.ready()
        if s.router is not None:
            return P.ModelList(data=[P.ModelCard(id=n, max_model_len=s.max_model_len) for n in (AUTO, *TARGETS)])
        base = model_name(s)
        cards = [P.ModelCard(id=base, max_model_len=s.max_model_len)]
        cards += [P.ModelCard(id=a, max_model_len=s.max_model_len, parent=base) for a in s.adapters]
        return P.ModelList(data=cards)

    @app.post("/v1/completions", dependencies=protected, response_model=P.CompletionResponse, responses=errors)
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        s = state.ready()
        answer_as, adapter = check_model(s, cfg, req.model)
        tok = s.tokenizer
        prompts = req.prompts()
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(
                400,
                f"{len(prompts)} prompts × n={req.n} = {len(prompts) * req.n} sequences; at most "
                f"{MAX_CHOICES} per request",
                param="n",
            )
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                check_text_size(s, len(p.encode("utf-8")), "prompt" if len(prompts) == 1 else f"prompt.{k}")
        encoded = await tokenize(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts])
        # echo + logprobs scores the prompt itself (how lm-eval and other scorers compute log-likelihoods)
        scoring = req.logprobs if req.echo else None
        jobs, prompt_tokens = [], 0
        for ids in encoded:
            check_ids(s, ids)
            max_tokens = fit(s, len(ids), req.max_tokens)
            prompt_tokens += len(ids)
            jobs += [(ids, sampling_params(req, max_tokens, req.logprobs, j, scoring)) for j in range(req.n)]
        route = await choose_route(s, cfg, metrics, answer_as, encoded)
        metrics.prompt_tokens.inc(prompt_tokens)
        prompt_of = [ids for ids in encoded for _ in range(req.n)]
        echo = [tok.decode(ids) if req.echo else "" for ids in prompt_of]
        streams = ChoiceStreams(submit(s, cfg, jobs, adapter, route), metrics, arrival)
        head = {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": answer_as}
        if route is not None:
            head |= {"model": route.target, "route": route.as_json()}
        offsets = [0] * len(jobs)  # text_offset of the next token, per choice
        first = [True] * len(jobs)

        def logprobs_of(i: int, evs: list[Any]) -> P.CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            out = P.CompletionLogprobs()
            entries = token_logprobs(tok, evs)
            if scoring is not None and evs and evs[0].prompt_logprobs is not None:  # this choice's first event
                entries = prompt_token_logprobs(tok, prompt_of[i], evs[0].prompt_logprobs) + entries
            for piece, lp, top in entries:
                out.tokens.append(piece)
                out.token_logprobs.append(lp)
                out.top_logprobs.append(dict(top) if req.logprobs and top is not None else None)
                out.text_offset.append(offsets[i])
                offsets[i] += len(piece)
            return out

        def chunks(i: int, ev: Any) -> list[dict]:
            text = ev.text
            if first[i]:
                text, first[i] = echo[i] + text, False
            if not (text or ev.finish_reason or req.logprobs is not None):
                return []
            choice = P.CompletionChoice(
                index=i, text=text, logprobs=logprobs_of(i, [ev]), finish_reason=ev.finish_reason
            )
            return [head | {"choices": [choice.model_dump()]}]

        def body(per_choice: list[list[Any]]) -> P.CompletionResponse:
            choices = [
                P.CompletionChoice(
                    index=i,
                    text=echo[i] + "".join(ev.text for ev in evs),
                    logprobs=logprobs_of(i, evs),
                    finish_reason=finish_reason(evs),
                )
                for i, evs in enumerate(per_choice)
            ]
            return P.CompletionResponse(**head, choices=choices, usage=usage(prompt_tokens, streams))

        return await _respond(request, req, streams, head, prompt_tokens, chunks, body, route)

    @app.post("/v1/chat/completions", dependencies=protected, response_model=P.ChatCompletionResponse, responses=errors)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        s = state.ready()
        answer_as, adapter = check_model(s, cfg, req.model)
        tok = s.tokenizer
        images = P.chat_images(req.messages)
        check_takes_images(s, images)
        check_text_size(s, sum(len(m.text().encode("utf-8")) for m in req.messages), "messages")

        ids = await tokenize(lambda: chat_ids(tok, req.messages, req.add_generation_prompt))
        check_ids(s, ids, len(images), "messages")
        if images:
            ids = expand_image_tokens(ids, s.image_token_id, s.image_prefix.num_tokens)
        max_tokens = fit(s, len(ids), req.max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, sampling_params(req, max_tokens, logprobs, j)) for j in range(req.n)]
        # after the cheap checks: decoding and encoding the images is the costly part of a request
        embeds = await tokenize(lambda: image_tokens(s, images)) if images else None
        route = await choose_route(s, cfg, metrics, answer_as, [ids])
        metrics.prompt_tokens.inc(len(ids))
        streams = ChoiceStreams(submit(s, cfg, jobs, adapter, route, embeds), metrics, arrival)
        head = {
            "id": P.new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": P.now(),
            "model": answer_as,
        }
        if route is not None:
            head |= {"model": route.target, "route": route.as_json()}
        first = [True] * req.n

        def logprobs_of(evs: list[Any]) -> P.ChoiceLogprobs | None:
            if not req.logprobs:
                return None
            return P.ChoiceLogprobs(
                content=[
                    P.TokenLogprob(
                        token=piece,
                        logprob=lp,
                        bytes=list(piece.encode()),
                        top_logprobs=[P.TopLogprob(token=t, logprob=tlp, bytes=list(t.encode())) for t, tlp in top],
                    )
                    for piece, lp, top in token_logprobs(tok, evs)
                ]
            )

        def chunks(i: int, ev: Any) -> list[dict]:
            out = []
            if first[i]:  # OpenAI opens every choice with a role-only delta
                first[i] = False
                out.append(
                    head
                    | {
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    }
                )
            if ev.text or ev.finish_reason or req.logprobs:
                lp = logprobs_of([ev])
                out.append(
                    head
                    | {
                        "choices": [
                            {
                                "index": i,
                                "delta": {"content": ev.text} if ev.text else {},
                                "logprobs": lp.model_dump() if lp else None,
                                "finish_reason": ev.finish_reason,
                            }
                        ]
                    }
                )
            return out

        def body(per_choice: list[list[Any]]) -> P.ChatCompletionResponse:
            choices = [
                P.ChatChoice(
                    index=i,
                    message=P.AssistantMessage(content="".join(ev.text for ev in evs)),
                    logprobs=logprobs_of(evs),
                    finish_reason=finish_reason(evs),
                )
                for i, evs in enumerate(per_choice)
            ]
            return P.ChatCompletionResponse(
                id=head["id"],
                created=head["created"],
                model=head["model"],
                choices=choices,
                usage=usage(len(ids), streams),
                route=head.get("route"),
            )

        return await _respond(request, req, streams, head, len(ids), chunks, body, route)

    @app.post("/generate", dependencies=protected, response_model=P.GenerateResponse, responses=errors)
    async def generate(req: P.GenerateRequest, request: Request) -> Any:
        """Plain text in, text out: {"prompt": "...", "max_tokens": 64, "temperature": 0} -> {"text": ...}."""
        arrival = time.perf_counter()
        s = state.ready()
        answer_as, adapter = check_model(s, cfg, req.model)
        check_text_size(s, len(req.prompt.encode("utf-8")), "prompt")
        ids = await tokenize(lambda: s.tokenizer.encode(req.prompt))
        check_ids(s, ids)
        params = sampling_params(req, fit(s, len(ids), req.max_tokens), None, 0)
        route = await choose_route(s, cfg, metrics, answer_as, [ids])
        metrics.prompt_tokens.inc(len(ids))
        streams = ChoiceStreams(submit(s, cfg, [(ids, params)], adapter, route), metrics, arrival)

        def body(per_choice: list[list[Any]]) -> P.GenerateResponse:
            (evs,) = per_choice
            return P.GenerateResponse(
                text="".join(ev.text for ev in evs), finish_reason=finish_reason(evs), usage=usage(len(ids), streams)
            )

        return await _respond(request, req, streams, {}, len(ids), lambda i, ev: [], body, route)

    # --- vLLM's tokenizer endpoints: lm-eval's `local-completions` (and other clients) tokenize through the server,
    # so they need no copy of the tokenizer and always agree with what the model is fed.
    @app.post("/tokenize", dependencies=protected, response_model=P.TokenizeResponse, responses=errors)
    async def tokenize_route(req: P.TokenizeRequest) -> P.TokenizeResponse:
        s = state.ready()
        check_model(s, cfg, req.model)
        tok = s.tokenizer
        if req.prompt is not None:
            check_text_size(s, len(req.prompt.encode("utf-8")), "prompt")
            ids = await tokenize(lambda: tok.encode(req.prompt))
        else:
            images = P.chat_images(req.messages)
            check_takes_images(s, images)
            check_text_size(s, sum(len(m.text().encode("utf-8")) for m in req.messages), "messages")
            ids = await tokenize(lambda: chat_ids(tok, req.messages, req.add_generation_prompt))
            if images:  # the ids the chat endpoint feeds the model (the images' own are not decoded here)
                check_ids(s, ids, len(images), "messages")
                ids = expand_image_tokens(ids, s.image_token_id, s.image_prefix.num_tokens)
        strs = [tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
        return P.TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", dependencies=protected, response_model=P.DetokenizeResponse, responses=errors)
    async def detokenize_route(req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        s = state.ready()
        check_model(s, cfg, req.model)
        bad = next((i for i in req.tokens if i >= s.vocab_size), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is out of range: the vocabulary has {s.vocab_size} ids", param="tokens"
            )
        return P.DetokenizeResponse(prompt=await tokenize(lambda: s.tokenizer.decode(req.tokens)))

    @app.get("/tokenizer_info", dependencies=protected, response_model=P.TokenizerInfo)
    async def tokenizer_info() -> P.TokenizerInfo:
        s = state.ready()
        tok = s.tokenizer

        def name(i: int | None) -> str | None:
            return None if i is None else tok.id_to_token(i)

        return P.TokenizerInfo(
            vocab_size=s.vocab_size,
            model_max_length=s.max_model_len,
            bos_token=name(tok.bos_id),
            eos_token=name(tok.eos_id),
            pad_token=name(tok.pad_id),
            chat_template=tok.chat_template,
        )
