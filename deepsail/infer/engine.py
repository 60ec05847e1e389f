"""Continuous batching: requests join and leave the running batch at every step, over a paged KV cache.

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=32, kv_budget_bytes=2 << 30))
    engine.start()                                        # the step loop runs in a background thread
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7))
    async for ev in handle.stream(): ...                  # or handle.result(timeout) from plain threads
    engine.shutdown(drain_timeout=30)

One step (`Engine.step`):
1. take in new submissions and cancellations;
2. schedule: every running request, oldest first, gets its next tokens — the next prefill chunk of a new or
   recomputing request, or the one token a decoding request sampled last step — under a per-step token budget.
   Its KV blocks grow on demand; when the pool is out of blocks the *newest* running request is preempted (its
   blocks freed, and it goes back to the front of the queue to be recomputed later) rather than failing anyone.
   Then waiting requests are admitted, first come first served, while the batch has room and the pool has free
   blocks for the whole prompt;
3. one forward pass over the right-padded batch with `last_logits_only=True`;
4. every row that has now seen all its tokens samples one, with its own SamplingParams; finished requests free
   their blocks at once.

Memory: one `KVPool` of fixed-size blocks, sized from a byte budget or a block count; `blocks.BlockAllocator`
hands them out with refcounts and keeps the prefix cache (full blocks findable by the hash of their token chain,
so a later request whose prompt starts with the same full blocks points its block table at them instead of
recomputing).

Python work per step is O(batch) plus the tokens fed; nothing loops over the vocabulary. The engine thread owns
all scheduling state; other threads only submit, cancel and read results through locks and queues, and async
consumers are woken with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepsail.infer.blocks import BlockAllocator
from deepsail.infer.graphs import compiled_hidden, decode_logits, enable_compiled_decode
from deepsail.infer.sampling import (
    FINISH_ABORT,
    DecodeState,
    SamplingParams,
    StreamEvent,
    default_stop_ids,
    probs_of,
    sample_states,
)
from deepsail.infer.speculative import accept, check_mtp, draft, mtp_catch_up, mtp_logits, uniforms
from deepsail.model import KVCache, KVPool, Transformer

__all__ = ["Engine", "EngineClosed", "EngineConfig", "QueueFull", "RequestHandle", "SamplingParams", "StreamEvent"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at `EngineConfig.max_waiting`; retry later (an HTTP server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and admits no new requests (an HTTP server answers 503)."""


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # running requests per step
    num_blocks: int | None = None  # KV pool size in blocks; else derived from kv_budget_bytes
    kv_budget_bytes: int | None = None  # default: room for max_batch_size full-length requests, capped (see below)
    block_size: int = 16  # tokens per KV block
    max_waiting: int = 256  # queued requests beyond which submit raises QueueFull
    max_model_len: int | None = None  # prompt + max_tokens limit; default the model's max_position_embeddings
    # Tokens computed per step: one per decoding request plus prefill chunks. Rows are right-padded to the longest
    # row, so this also bounds the padding a long prefill imposes on the decoding rows beside it.
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    # Decode-only steps (every row one token) through one compiled graph (infer/graphs.py): 1.9-2.5x the tok/s of
    # eager on deepseek-v3-small, after a first compile of ~20-40 s on CPU.
    compile_decode: bool = False
    # MTP self-speculative decoding (infer/speculative.py): each decoding request drafts up to this many tokens per
    # step with the model's MTP head and verifies them in the step's one forward, greedy or sampled (rejection
    # sampling keeps the target distribution). 0 = off. Steps then run eager: the MTP needs the hidden states.
    speculative: int = 0
    recent_samples: int = 1024  # how many recent TTFT / inter-token latencies `stats()` returns
    # The placeholder id an image-conditioned decoder's prompts hold, one per image token (multimodal/connector.py):
    # a request's `image_embeds` fill those positions' embeddings at prefill. None: the model takes no images.
    image_token_id: int | None = None


# --- requests and their handles ---------------------------------------------------------------------------------------
class RequestHandle:
    """What `Engine.submit` returns: stream the tokens, wait for the result, or cancel."""

    def __init__(self, engine: Engine, request_id: int, state: DecodeState) -> None:
        self.request_id = request_id
        self._engine, self._state = engine, state
        self._cond = threading.Condition()
        self._events: list[StreamEvent] = []
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._error: BaseException | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        # Timings (time.monotonic seconds) for the server's own histograms.
        self.metrics: dict[str, float | None] = {"arrival": time.monotonic(), "first_token": None, "finished": None}

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self._error is not None

    # called from the engine thread
    def _push(self, event: StreamEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            self._cond.notify_all()
            if self._async is not None:
                self._call_soon(event)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
            if self._async is not None:
                self._call_soon(error)

    def _call_soon(self, item: StreamEvent | BaseException) -> None:
        loop, queue = self._async
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    # consumers
    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Events as they are produced (one consumer per handle). Ends after the event with a finish_reason."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            backlog, error = list(self._events), self._error
            self._async = (asyncio.get_running_loop(), queue)
        for event in backlog:
            yield event
            if event.finish_reason is not None:
                return
        if error is not None:
            raise error
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator over the events (for threads and terminals); `timeout` bounds each wait."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda i=i: i < len(self._events) or self._error is not None, timeout):
                    raise TimeoutError(f"request {self.request_id}: no token within {timeout}s")
                if i >= len(self._events):
                    raise self._error
                event = self._events[i]
            i += 1
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[str, list[int], str, dict[str, int]]:
        """Block until finished: (text, token_ids, finish_reason, usage)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.request_id} not finished within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._state.text, list(self._state.output_ids), self.finish_reason, dict(self.usage or {})

    @property
    def prompt_logprobs(self) -> list[tuple[float, list[tuple[int, float]]] | None] | None:
        """With `SamplingParams.prompt_logprobs`: per prompt token, (its log-probability given the ones before it,
        the top n (id, log-probability)); None for the first token. Complete once the first token is out."""
        return self._state.prompt_logprobs

    @property
    def prompt_entropy(self) -> list[float | None] | None:
        """With `SamplingParams.prompt_logprobs`: per prompt token, the entropy (nats) of the model's next-token
        distribution at the position before it; None for the first token. Complete once the first token is out."""
        return self._state.prompt_entropy

    def cancel(self) -> None:
        """Stop generating; the request's blocks are freed within one step and its stream ends with "abort"."""
        self._engine._cancel(self.request_id)


class _Request:
    """The engine thread's view of a request."""

    def __init__(
        self,
        request_id: int,
        prompt_ids: list[int],
        state: DecodeState,
        handle: RequestHandle,
        adapter: int = 0,
        image_embeds: torch.Tensor | None = None,
        image_token_id: int | None = None,
    ) -> None:
        self.id = request_id
        self.adapter = adapter  # index in the engine's AdapterSet; 0 = the base model
        self.prompt_len = len(prompt_ids)
        self.tokens = list(prompt_ids)  # prompt + output: what the KV cache must hold
        self.state, self.handle = state, handle
        self.blocks: list[int] = []  # block table row
        self.hashes: list[int] = []  # chain hash of each full block computed so far
        self.num_computed = 0  # tokens whose KV entries are in the cache
        # speculation: tokens drafted for the next step (fed after tokens[-1]) and the distributions they came from
        self.drafts: list[int] = []
        self.draft_q: torch.Tensor | None = None  # [len(drafts), V]
        self.mtp_computed = 0  # positions the MTP module has caught up over (its KV layer holds them)
        self.drafted = self.accepted = 0
        self.cached_tokens: int | None = None  # prefix-cache hits at first admission (usage.cached_tokens)
        self.last_token_time: float | None = None
        # Image tokens: row k of image_embeds is the embedding at prompt position image_positions[k]. The images'
        # digest starts the block-hash chain: the same placeholder ids with another image are other KV entries.
        self.image_embeds = image_embeds
        self.image_positions = (
            torch.tensor([i for i, t in enumerate(prompt_ids) if t == image_token_id], dtype=torch.long)
            if image_embeds is not None
            else None
        )
        self.image_digest = (
            hashlib.sha256(image_embeds.detach().float().cpu().numpy().tobytes()).hexdigest()
            if image_embeds is not None
            else None
        )


# --- the engine -------------------------------------------------------------------------------------------------------
class Engine:
    """The continuous-batching engine. Thread-safe API: `submit`, `RequestHandle.stream/result/cancel`, `stats`,
    `shutdown`; the step loop runs in `start()`'s thread, or in the caller with `step()` / `run_until_idle()`."""

    def __init__(
        self, model: Transformer, tokenizer: Any = None, config: EngineConfig | None = None, adapters: Any = None
    ) -> None:
        """`adapters`: a `deepsail.tune.lora.AdapterSet` already applied to `model`; each request may name one."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.config = cfg = config or EngineConfig()
        if cfg.compile_decode:
            enable_compiled_decode(model)
        if cfg.speculative < 0 or cfg.max_num_batched_tokens < cfg.max_batch_size * (1 + cfg.speculative):
            raise ValueError(
                f"speculative={cfg.speculative}: need a draft count >= 0 and max_num_batched_tokens >= "
                f"max_batch_size x (1 + speculative) = {cfg.max_batch_size * (1 + cfg.speculative)}, got "
                f"{cfg.max_num_batched_tokens}: every decoding row feeds its token and its drafts"
            )
        self.speculative = cfg.speculative
        if cfg.speculative:
            check_mtp(model)
        c = model.config
        self.max_model_len = cfg.max_model_len or c.max_position_embeddings
        if self.max_model_len > c.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        if cfg.max_batch_size < 1 or cfg.block_size < 1 or cfg.max_num_batched_tokens < cfg.max_batch_size:
            raise ValueError(
                f"need max_batch_size >= 1, block_size >= 1 and max_num_batched_tokens >= max_batch_size, "
                f"got {cfg.max_batch_size}, {cfg.block_size}, {cfg.max_num_batched_tokens}"
            )
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        spec = bool(cfg.speculative)  # the MTP module's KV layer lives in the pool beside the main layers'
        self.pool = KVPool(c, self._num_blocks(), cfg.block_size, self.dtype, self.device, include_mtp=spec)
        self.allocator = BlockAllocator(self.pool.num_blocks)
        self.eos_ids = default_stop_ids(c, tokenizer)

        self.running: list[_Request] = []  # admission order: oldest first, newest (first to be preempted) last
        self.waiting: deque[_Request] = deque()
        self._by_id: dict[int, _Request] = {}
        self._inbox: deque[_Request] = deque()  # submitted by other threads, taken in at the next step
        self._cancels: deque[int] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = True

        self.counters = dict(
            preemptions=0,
            prefix_hits=0,
            prefix_queries=0,
            requests_finished=0,
            requests_aborted=0,
            prompt_tokens=0,
            generation_tokens=0,
            steps=0,
            ttft_count=0,
            ttft_sum=0.0,
            itl_count=0,
            itl_sum=0.0,
            spec_draft_tokens=0,
            spec_accepted_tokens=0,
        )
        self._ttft: deque[float] = deque(maxlen=cfg.recent_samples)
        self._itl: deque[float] = deque(maxlen=cfg.recent_samples)

    def _num_blocks(self) -> int:
        cfg = self.config
        probe = KVPool(
            self.model.config, 1, cfg.block_size, self.dtype, "meta", include_mtp=bool(cfg.speculative)
        )  # measures, allocates nothing
        bytes_per_block = probe.bytes_per_token * cfg.block_size
        if cfg.num_blocks is not None:
            n = cfg.num_blocks
        else:
            budget = cfg.kv_budget_bytes
            if budget is None:
                # Room for every slot of the batch at full length, but never more than a quarter of free GPU
                # memory (the weights and activations need the rest) or 2 GiB of host RAM.
                blocks_per_request = -(-self.max_model_len // cfg.block_size)  # a partial last block is a block
                want = cfg.max_batch_size * blocks_per_request * bytes_per_block
                if self.device.type == "cuda":
                    cap = torch.cuda.mem_get_info(self.device)[0] // 4
                else:
                    cap = 2 << 30
                budget = min(want, cap)
            n = budget // bytes_per_block
        if n < 1:
            raise ValueError(
                f"the KV budget holds no block: one block of {cfg.block_size} tokens takes "
                f"{bytes_per_block} bytes; raise kv_budget_bytes / num_blocks"
            )
        return n

    # --- the public API (any thread) ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> RequestHandle:
        """Queue a request (with `adapter`, one of the engine's adapters by name). `image_embeds` [K, hidden] are the
        embeddings of the prompt's K image placeholder ids (`EngineConfig.image_token_id`), in order. Raises
        ValueError if it can never run, QueueFull if the queue is full, EngineClosed after shutdown began."""
        params = params or SamplingParams()
        adapter_index = 0
        if adapter is not None:
            names = self.adapters.names if self.adapters is not None else []
            if adapter not in names:
                raise ValueError(f"unknown adapter {adapter!r}; this engine serves {names or 'no adapters'}")
            adapter_index = self.adapters.index(adapter)
        if not self._accepting:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: generation needs at least one token to condition on")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens"
            )
        blocks = -(-total // self.config.block_size)
        if blocks > self.pool.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs {blocks} KV blocks, but the whole pool has "
                f"{self.pool.num_blocks}; raise kv_budget_bytes / num_blocks or lower max_tokens"
            )
        image_id = self.config.image_token_id
        if image_embeds is not None:
            if image_id is None:
                raise ValueError("this model takes no images (its engine has no image_token_id)")
            slots = sum(t == image_id for t in prompt)
            if image_embeds.shape != (slots, self.model.config.hidden_size):
                raise ValueError(
                    f"image_embeds {list(image_embeds.shape)} must be [image placeholders in the prompt, hidden] = "
                    f"{[slots, self.model.config.hidden_size]}"
                )
            image_embeds = image_embeds.detach().to(self.device, self.dtype)
        elif image_id is not None and image_id in prompt:
            raise ValueError("the prompt holds image placeholders but no image_embeds came with it")
        state = DecodeState(prompt, params, self.tokenizer, self.eos_ids)  # may raise ValueError (bad stop rules)
        with self._lock:
            if len(self._inbox) + len(self.waiting) >= self.config.max_waiting:
                raise QueueFull(f"{self.config.max_waiting} requests are already waiting; retry later")
            rid = next(self._ids)
            handle = RequestHandle(self, rid, state)
            self._inbox.append(_Request(rid, prompt, state, handle, adapter_index, image_embeds, image_id))
        self._wake.set()
        return handle

    def _cancel(self, request_id: int) -> None:
        self._cancels.append(request_id)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Gauges, counters and recent latency samples (seconds) for a metrics endpoint."""
        with self._lock:
            waiting = len(self.waiting) + len(self._inbox)
        a = self.allocator
        return dict(
            running=len(self.running),
            waiting=waiting,
            kv_blocks_used=a.num_used,
            kv_blocks_total=a.num_blocks,
            kv_blocks_cached=len(a.evictable),
            kv_usage=a.num_used / a.num_blocks,
            block_size=self.config.block_size,
            **self.counters,
            ttft_seconds=list(self._ttft),
            itl_seconds=list(self._itl),
        )

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; call it after the model's weights change (RL trains the model this engine
        samples from), so no request reuses keys and values the old weights computed. Only between requests."""
        if self.has_work:
            raise RuntimeError("reset_prefix_cache() while requests are in flight; call it when the engine is idle")
        self.allocator.forget_prefixes()

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox or self._cancels)

    def start(self) -> Engine:
        """Run the step loop in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deepsail-engine", daemon=True)
            self._thread.start()
        return self

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Step in the calling thread until every request is done (offline use and tests; not with start())."""
        assert self._thread is None, "the background thread is stepping already"
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work:
                return
            self.step()

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let accepted requests finish for up to `drain_timeout` seconds, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.has_work and time.monotonic() < deadline:
            if self._thread is not None:
                time.sleep(0.005)
            else:
                self.step()
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            left = list(self.running) + list(self.waiting) + list(self._inbox)
            self.waiting.clear()
            self._inbox.clear()
        for req in left:
            self._finish(req)

    # --- the step loop (engine thread) -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                busy = self.step()
            except Exception as e:  # a failed forward fails the requests in flight, not the server
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                busy = False
            if not busy:
                self._wake.wait(0.1)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            reqs = list(self.running) + list(self.waiting) + list(self._inbox)
            self.running.clear()
            self.waiting.clear()
            self._inbox.clear()
        for req in reqs:
            self._free(req)
            self._by_id.pop(req.id, None)
            req.handle._fail(error)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling round and forward pass. Returns False when there was nothing to do."""
        self._take_in()
        batch = self._schedule()
        if not batch:
            return False
        self.counters["steps"] += 1
        fed = [r.tokens[r.num_computed : r.num_computed + n - len(r.drafts)] + r.drafts for r, n in batch]
        T = max(n for _, n in batch)
        width = max(len(r.blocks) for r, _ in batch)
        ids = [f + [0] * (T - len(f)) for f in fed]
        table = torch.tensor([r.blocks + [-1] * (width - len(r.blocks)) for r, _ in batch], device=self.device)
        dev = self.device
        cache = KVCache(self.pool, table, torch.tensor([r.num_computed for r, _ in batch], device=dev))
        # Rows that score their prompt (prompt_logprobs) need every position's logits, not just the last: the model
        # hands back its hidden states and only those rows' prompt positions go through the head.
        scoring = [
            i for i, (r, _) in enumerate(batch) if r.state.prompt_logprobs is not None and r.num_computed < r.prompt_len
        ]
        # Rows may use different adapters: each adapted layer adds its rows' low-rank products (lora.AdapterSet).
        rows = self.adapters.select([r.adapter for r, _ in batch], T, dev) if self.adapters else nullcontext()
        feed = torch.tensor([n for _, n in batch], device=dev)
        hidden = None
        ids_t = torch.tensor(ids, device=dev)
        embeds = self._image_embeds(batch, ids_t)
        plain = embeds is None and not scoring and not self.adapters
        compiled = getattr(self.model, "compiled_decode", None) is not None
        if compiled and plain and self.speculative and T <= 1 + self.speculative:
            # Decode rows, some feeding drafts: the compiled graph where enabled. Feeds of 2..k+1 tokens are padded to
            # k + 1 (the rows' lengths say what is real), so one graph serves them rather than one per width.
            width = 1 if T == 1 else 1 + self.speculative
            hidden = compiled_hidden(self.model, F.pad(ids_t, (0, width - T)), cache, feed)
        if hidden is not None:
            logits = self.model.logits_of(hidden[torch.arange(len(batch), device=dev), feed - 1])
        elif T == 1 and plain and not self.speculative:
            logits = decode_logits(self.model, ids_t, cache, feed)  # decode-only: compiled if enabled
        else:
            with rows:
                out = self.model(
                    ids_t,
                    cache=cache,
                    input_lens=feed,
                    last_logits_only=True,
                    return_hidden=bool(scoring) or bool(self.speculative),
                    inputs_embeds=embeds,
                )
            logits, hidden = out.logits[:, 0], out.hidden
            for i in scoring:
                self._score_prompt(batch[i][0], out.hidden[i, : batch[i][1]])

        # Rows that fed drafts verify them (their accepted tokens, then one more); the others sample one token once
        # they have seen all of theirs. committed[i]: the fed tokens that stay in the cache.
        spec = [i for i, (r, _) in enumerate(batch) if r.drafts]
        emitted: dict[int, list[int]] = self._verify(batch, spec, hidden) if spec else {}
        committed = [len(emitted[i]) if i in emitted else n for i, (_, n) in enumerate(batch)]
        ready = []
        for i, (req, _) in enumerate(batch):
            req.num_computed += committed[i]
            if i in emitted:
                req.drafts, req.draft_q = [], None
                req.tokens += emitted[i]  # registered below only as far as num_computed reaches
            if self.config.enable_prefix_caching:
                self._register_full_blocks(req)
            if i not in emitted and req.num_computed == len(req.tokens):  # the last chunk: its logits sample next
                ready.append(i)
        events: dict[int, list[StreamEvent]] = {}
        if ready:
            sampled = sample_states(logits[torch.tensor(ready, device=dev)], [batch[i][0].state for i in ready])
            for i, event in zip(ready, sampled):
                batch[i][0].tokens.append(event.token_id)
                events[i] = [event]
        for i in spec:
            state, out_ = batch[i][0].state, []
            for tok in emitted[i]:
                out_.append(state.append(tok))
                if state.done:
                    break
            events[i] = out_
        if self.speculative:
            self._draft_next(batch, committed, hidden, table)
        now = time.monotonic()
        for i, evs in events.items():
            req = batch[i][0]
            for j, event in enumerate(evs):
                self._timed(req, event, now, first_of_step=j == 0)
                if event.finish_reason is not None:
                    self._finish(req, event)
                else:
                    req.handle._push(event)
        return True

    def _image_embeds(self, batch: list[tuple[_Request, int]], ids_BT: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings when a row's fed span crosses image placeholders (else None: the model
        embeds the ids itself): token embeddings with those positions' rows replaced by the image's."""
        embeds = None
        for i, (req, n) in enumerate(batch):
            if req.image_positions is None or req.num_computed >= req.prompt_len:
                continue
            pos = req.image_positions
            inside = ((pos >= req.num_computed) & (pos < req.num_computed + n)).nonzero().squeeze(1)
            if not len(inside):
                continue
            if embeds is None:
                embeds = self.model.embed_tokens(ids_BT)
            embeds[i, (pos[inside] - req.num_computed).to(embeds.device)] = req.image_embeds[inside.to(embeds.device)]
        return embeds

    def _timed(self, req: _Request, event: StreamEvent, now: float, first_of_step: bool) -> None:
        """TTFT / inter-token latency bookkeeping for one token (a step's later tokens arrive 0 s after its first)."""
        self.counters["generation_tokens"] += 1
        if req.last_token_time is None:
            event.prompt_logprobs = req.state.prompt_logprobs
            ttft = now - req.handle.metrics["arrival"]
            req.handle.metrics["first_token"] = now
            self._ttft.append(ttft)
            self.counters["ttft_count"] += 1
            self.counters["ttft_sum"] += ttft
        else:
            gap = now - req.last_token_time if first_of_step else 0.0
            self._itl.append(gap)
            self.counters["itl_count"] += 1
            self.counters["itl_sum"] += gap
        req.last_token_time = now

    # --- speculation (EngineConfig.speculative; the pieces are infer/speculative.py's) -------------------------------
    def _verify(self, batch: list[tuple[_Request, int]], spec: list[int], hidden: torch.Tensor) -> dict[int, list[int]]:
        """Rows that fed [t_n, d_1..d_k]: the kept drafts and the token after them, by rejection sampling against
        the main model's distributions at those positions (greedy rows: the plain greedy tokens)."""
        reqs = [batch[i][0] for i in spec]
        k = max(len(r.drafts) for r in reqs)
        dev = self.device
        k_S = torch.tensor([len(r.drafts) for r in reqs], device=dev)
        logits = self.model.logits_of(hidden[torch.tensor(spec, device=dev), : k + 1])  # [S, k+1, V]
        params = [r.state.params for r in reqs for _ in range(k + 1)]
        P = probs_of(logits.flatten(0, 1), params).view(len(reqs), k + 1, -1)
        V = P.shape[-1]
        Q = torch.zeros(len(reqs), k, V, device=dev)
        D = torch.zeros(len(reqs), k, dtype=torch.long, device=dev)
        for j, r in enumerate(reqs):
            Q[j, : len(r.drafts)] = r.draft_q
            D[j, : len(r.drafts)] = torch.tensor(r.drafts, device=dev)
        m, nxt = accept(P, Q, D, k_S, uniforms([r.state for r in reqs], k + 1).to(dev))
        out = {}
        for i, r, m_, n_ in zip(spec, reqs, m.tolist(), nxt.tolist()):
            r.drafted += len(r.drafts)
            r.accepted += m_
            self.counters["spec_draft_tokens"] += len(r.drafts)
            self.counters["spec_accepted_tokens"] += m_
            out[i] = r.drafts[:m_] + [n_]
        return out

    def _speculates(self, req: _Request) -> bool:
        """Drafts are verified against whole distributions; a row whose next token also depends on its past output
        (repetition penalty), a grammar, or that reports logprobs takes one plainly sampled token per step."""
        p = req.state.params
        return req.state.grammar is None and p.logprobs is None and p.repetition_penalty == 1.0

    def _draft_next(
        self, batch: list[tuple[_Request, int]], committed: list[int], hidden: torch.Tensor, table: torch.Tensor
    ) -> None:
        """Catch the MTP up over every row's newly committed positions (so its KV layer stays complete, prefix-cached
        blocks included), then draft the next step's tokens for the decoding rows that may speculate."""
        dev, B = self.device, len(batch)
        alive = [not req.state.done for req, _ in batch]  # finished rows are freed after this
        lens = torch.tensor([c if a else 0 for c, a in zip(committed, alive)], device=dev)
        if not bool(lens.any()):
            return
        T = hidden.shape[1]
        nxt = torch.zeros(B, T, dtype=torch.long)
        for b, (req, _) in enumerate(batch):  # position i reads the token at i + 1 (known now: sampled or prompt)
            if alive[b]:
                start = req.num_computed - committed[b] + 1
                nxt[b, : committed[b]] = torch.tensor(req.tokens[start : start + committed[b]])
        view = KVCache(self.pool, table, torch.tensor([r.mtp_computed for r, _ in batch], device=dev))
        h = mtp_catch_up(self.model, hidden, nxt.to(dev), view, lens)
        for b, (req, _) in enumerate(batch):
            req.mtp_computed += int(lens[b])
        # Who drafts: decoding rows (prompt done), eligible, with output budget for more than one token and blocks
        # for the drafts' entries (the verify writes k + 1 of them); too few free blocks -> one plain token instead.
        k_B = [0] * B
        for b, (req, _) in enumerate(batch):
            left = req.state.params.max_tokens - len(req.state.output_ids)
            if not alive[b] or len(req.tokens) - req.num_computed != 1 or not self._speculates(req) or left < 2:
                continue
            k = min(self.speculative, left - 1)
            need = -(-(req.num_computed + k + 1) // self.config.block_size) - len(req.blocks)
            if need > self.allocator.num_free:
                continue
            req.blocks += [self.allocator.allocate() for _ in range(need)]
            k_B[b] = k
        rows = [b for b in range(B) if k_B[b]]
        if not rows:
            return
        idx = torch.tensor(rows, device=dev)
        last = h[idx, lens[idx] - 1]  # the MTP's state at each row's last committed position
        width = max(len(batch[b][0].blocks) for b in rows)
        sub = KVCache(
            self.pool,
            torch.tensor([batch[b][0].blocks + [-1] * (width - len(batch[b][0].blocks)) for b in rows], device=dev),
            torch.tensor([batch[b][0].mtp_computed for b in rows], device=dev),
        )
        states = [batch[b][0].state for b in rows]
        D, Q = draft(
            self.model,
            last,
            mtp_logits(self.model, last),
            sub,
            torch.tensor([k_B[b] for b in rows], device=dev),
            states,
        )
        for j, b in enumerate(rows):
            req = batch[b][0]
            req.drafts, req.draft_q = D[j, : k_B[b]].tolist(), Q[j, : k_B[b]]

    def _take_in(self) -> None:
        with self._lock:
            while self._inbox:
                req = self._inbox.popleft()
                self._by_id[req.id] = req
                self.waiting.append(req)
        while self._cancels:
            req = self._by_id.get(self._cancels.popleft())
            if req is None or req.handle.done:
                continue
            with self._lock:
                if req in self.waiting:
                    self.waiting.remove(req)
            self._finish(req)

    def _schedule(self) -> list[tuple[_Request, int]]:
        """(request, number of tokens to compute this step) for every row of the next forward."""
        cfg, bs = self.config, self.config.block_size
        # Decoding rows (one token each) always fit, since max_num_batched_tokens >= max_batch_size; prefill
        # chunks share what is left, oldest request first. A long prompt never stalls the decoders beside it.
        budget = cfg.max_num_batched_tokens - sum(
            1 + len(r.drafts) for r in self.running if len(r.tokens) - r.num_computed == 1
        )
        batch: list[tuple[_Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running):
            req = self.running[i]
            remaining = len(req.tokens) - req.num_computed
            n = 1 + len(req.drafts) if remaining == 1 else min(remaining, budget)  # a decoding row: token + drafts
            if n == 0:  # a prefill with no budget left this step
                i += 1
                continue
            need = -(-(req.num_computed + n) // bs) - len(req.blocks)
            if need > self.allocator.num_free:
                # Out of KV blocks: the newest request gives its blocks back and will be recomputed later
                # (possibly this one, which ends the loop).
                self._preempt(self.running[-1])
                preempted = True
                continue
            req.blocks += [self.allocator.allocate() for _ in range(need)]
            batch.append((req, n))
            if remaining > 1:
                budget -= n
            i += 1
        # Admit waiting requests (not in a step that had to preempt: there is no room to grow into).
        while self.waiting and not preempted and budget > 0 and len(self.running) < cfg.max_batch_size:
            req = self.waiting[0]
            hit, hashes = self._match_prefix(req)
            need = -(-len(req.tokens) // bs) - len(hit)
            if need > self.allocator.num_free:  # admission control: the whole prompt must fit now
                for block in reversed(hit):
                    self.allocator.release(block)
                break
            with self._lock:
                self.waiting.popleft()
            req.blocks = hit + [self.allocator.allocate() for _ in range(need)]
            req.hashes, req.num_computed = hashes, len(hit) * bs
            # The MTP entries of cached blocks were written by the request that computed them (every row catches
            # the MTP up in a speculative engine); only the last position of such a block read that request's next
            # token, which may differ from ours: a worse draft at worst, never a wrong output.
            req.mtp_computed = req.num_computed
            if cfg.enable_prefix_caching:
                self.counters["prefix_queries"] += len(req.tokens)
                self.counters["prefix_hits"] += req.num_computed
            if req.cached_tokens is None:  # first admission (not a readmission after preemption)
                req.cached_tokens = min(req.num_computed, req.prompt_len)
                self.counters["prompt_tokens"] += req.prompt_len
            self.running.append(req)
            n = min(len(req.tokens) - req.num_computed, budget)
            batch.append((req, n))
            budget -= n
        return batch

    def _score_prompt(self, req: _Request, hidden_ND: torch.Tensor, chunk: int = 256) -> None:
        """Log-probabilities of the prompt tokens this step's chunk predicts: position p's logits score token p + 1.
        In slices of `chunk` positions, so a long prompt never materialises [len, vocab] logits at once."""
        start = req.num_computed
        m = min(len(hidden_ND), req.prompt_len - 1 - start)  # positions whose next token is still prompt
        n_top = req.state.params.prompt_logprobs
        for a in range(0, max(m, 0), chunk):
            b = min(a + chunk, m)
            logp = self.model.logits_of(hidden_ND[a:b]).float().log_softmax(-1)
            targets = torch.tensor(req.tokens[start + a + 1 : start + b + 1], device=logp.device)
            chosen = logp.gather(1, targets[:, None]).squeeze(1).tolist()
            # one more pass over the [chunk, V] log-probs already in hand (the head's matmul before it is D x as much);
            # entr() is -p log p with 0 at p = 0, where exp(logp) * logp would give nan for a -inf logit
            entropy = torch.special.entr(logp.exp()).sum(-1).tolist()
            if n_top:
                top_lp, top_ids = logp.topk(n_top, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
            else:
                tops = [[] for _ in chosen]
            for j, (lp, top, h) in enumerate(zip(chosen, tops, entropy)):
                req.state.prompt_logprobs[start + a + j + 1] = (lp, top)
                req.state.prompt_entropy[start + a + j + 1] = h

    def _match_prefix(self, req: _Request) -> tuple[list[int], list[int]]:
        """Cached blocks for the longest run of req's full leading blocks, and their chain hashes. At least one
        token is always left to compute: its logits are where sampling starts. A request that scores its prompt
        computes all of it (a cached block has no logits to score)."""
        if not self.config.enable_prefix_caching or req.state.prompt_logprobs is not None:
            return [], []
        bs = self.config.block_size
        blocks, hashes, h = [], [], self._chain_seed(req)
        for j in range((len(req.tokens) - 1) // bs):
            key = (h, tuple(req.tokens[j * bs : (j + 1) * bs]))
            block = self.allocator.lookup(key)
            if block is None:
                break
            h = hash(key)
            blocks.append(block)
            hashes.append(h)
        return blocks, hashes

    @staticmethod
    def _chain_seed(req: _Request) -> int:
        """Where a request's block-hash chain starts: the same tokens under another adapter, or with other images in
        their placeholders, are other KV entries."""
        if req.adapter == 0 and req.image_digest is None:
            return 0
        return hash(("adapter", req.adapter, req.image_digest))

    def _register_full_blocks(self, req: _Request) -> None:
        bs = self.config.block_size
        while len(req.hashes) < req.num_computed // bs:
            j = len(req.hashes)
            key = (req.hashes[-1] if req.hashes else self._chain_seed(req), tuple(req.tokens[j * bs : (j + 1) * bs]))
            self.allocator.register(req.blocks[j], key)
            req.hashes.append(hash(key))

    def _preempt(self, req: _Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.num_computed, req.hashes = 0, []
        req.mtp_computed, req.drafts, req.draft_q = 0, [], None
        with self._lock:
            self.waiting.appendleft(req)
        self.counters["preemptions"] += 1

    def _free(self, req: _Request) -> None:
        # Tail blocks first, so the evictable LRU gives up a sequence's end before its (more shareable) start.
        for block in reversed(req.blocks):
            self.allocator.release(block)
        req.blocks = []

    def _finish(self, req: _Request, last: StreamEvent | None = None) -> None:
        """End a request: free its blocks, set usage, push its last event (`last`, or an "abort" event)."""
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        self._by_id.pop(req.id, None)
        state, handle = req.state, req.handle
        # usage is set before the last event is pushed, so a consumer that sees the finish can read it
        handle.usage = dict(
            prompt_tokens=req.prompt_len,
            completion_tokens=len(state.output_ids),
            total_tokens=req.prompt_len + len(state.output_ids),
            cached_tokens=req.cached_tokens or 0,
        )
        if self.speculative:  # tokens the MTP head proposed for this request, and how many the model kept
            handle.usage |= dict(draft_tokens=req.drafted, accepted_tokens=req.accepted)
        handle.metrics["finished"] = time.monotonic()
        if last is None:
            self.counters["requests_aborted"] += 1
            state.finish_reason = FINISH_ABORT
            last = StreamEvent(None, state.text_tracker.flush(), finish_reason=FINISH_ABORT)
        else:
            self.counters["requests_finished"] += 1
        handle._push(last)
