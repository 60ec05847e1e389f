"""Choosing the next token: sampling parameters, the batched sampler, and the per-request output state.

One `sample` call handles a whole batch whose rows each have their own `SamplingParams`: the transforms are
tensor ops over [B, V] (never a Python loop over the vocabulary); the only per-row Python is building small [B]
tensors and drawing one uniform number per sampled row from that request's own `torch.Generator`. That last
detail is what makes a seeded request reproducible whatever else shares its batch: its random stream is
consumed exactly once per sampled token, by nobody else.

Order of the transforms (HF's): repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample.
Logprobs are those of the model's own distribution (log-softmax of the raw logits, before any transform), as
vLLM reports them by default.

`DecodeState` is everything one request accumulates while it decodes: ids, logprobs, incrementally decoded
text, and the stop rules (stop token ids, stop strings, max tokens), and for structured output its grammar matcher
(`structured.py`: `sample_states` masks the row to the grammar's allowed tokens). `generate`, the speculative decoder
and the continuous-batching engine all feed it one token at a time, so they agree on when and how a request ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepsail.flags import knob

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass
class SamplingParams:
    """How one request is decoded. Defaults follow vLLM/OpenAI: temperature 1, everything else off."""

    max_tokens: int = knob(256, "Most tokens to generate.")
    temperature: float = knob(1.0, "Sampling temperature; 0 = greedy.")
    top_k: int = knob(0, "Sample from the k most likely tokens only; 0 = off.")
    top_p: float = knob(1.0, "Nucleus sampling: the smallest set of tokens with this much probability; 1 = off.")
    min_p: float = knob(0.0, "Drop tokens below min_p x the top token's probability; 0 = off.")
    repetition_penalty: float = knob(1.0, "Penalise tokens already in the prompt or output (>1); 1 = off.")
    stop: Sequence[str] = knob((), "Stop string (repeatable); the text ends right before the first one.")
    stop_token_ids: Sequence[int] = knob(
        (), "Extra token id that ends generation (EOS always does unless --ignore-eos)."
    )
    seed: int | None = knob(None, "Random seed: the same seed gives the same tokens, whatever shares the batch.")
    logprobs: int | None = knob(None, "Report log-probabilities: 0 = the chosen token's, n = also the top n.")
    prompt_logprobs: int | None = knob(
        None,
        "Score the prompt too: each prompt token's log-probability given the "
        "ones before it (0 = just that, n = also the top n).",
    )
    ignore_eos: bool = knob(False, "Keep generating past EOS (benchmarks).")
    json_schema: str | None = knob(
        None,
        'Constrain the output to compact JSON valid under this JSON schema (its JSON text; \'{"type": "object"}\' '
        "= any object). Needs the `structured` extra (llguidance).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(i) for i in self.stop_token_ids)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 turns it off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1] (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 turns it off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name}={value}: must be between 0 and 20 (OpenAI's limit)")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)}: token ids are >= 0")
        if self.json_schema is not None:
            from deepsail.infer.structured import compile_schema

            compile_schema(self.json_schema)  # ValueError naming what is wrong with it
            # Either would end the text where the grammar has not: the JSON would not parse.
            if self.stop or self.stop_token_ids or self.ignore_eos:
                raise ValueError(
                    "structured output (json_schema / response_format) ends when the JSON is complete: it takes no "
                    "stop strings, stop_token_ids or ignore_eos"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        """The request's private random stream (CPU, so a seed means the same on every device)."""
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


# --- the transforms, each a pure function of [B, V] logits and [B] parameters ------------------------------------
def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    """CTRL/HF rule: a seen token's logit is divided by the penalty if positive, multiplied if negative, so the
    penalty always pushes it down (for penalty > 1)."""
    p = penalty_B[:, None]
    penalised = torch.where(logits_BV > 0, logits_BV / p, logits_BV * p)
    return torch.where(seen_BV, penalised, logits_BV)


def mask_logits(
    logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, min_p_B: torch.Tensor
) -> torch.Tensor:
    """-inf on every token that top-k, top-p or min-p removes; row b uses its own k, p and min-p (0 / 1 / 0 = off).

    Top-p keeps the smallest set of most likely tokens whose mass reaches p: a token survives when the mass of
    the tokens ranked above it is still below p, so the top token always survives.
    """
    V = logits_BV.shape[1]
    if bool((top_k_B > 0).any()) or bool((top_p_B < 1).any()):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits_BV.device)
        k = torch.where(top_k_B > 0, top_k_B, V)
        drop = rank[None] >= k[:, None]
        probs = sorted_BV.masked_fill(drop, float("-inf")).softmax(-1)
        mass_above = probs.cumsum(-1) - probs
        # p = 1 must keep everything: rounding can push the cumulative mass of the tail to 1.0000001.
        p = torch.where(top_p_B < 1, top_p_B, 2.0)
        drop |= mass_above >= p[:, None]
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop).scatter_(1, order_BV, drop), float("-inf"))
    if bool((min_p_B > 0).any()):
        probs = logits_BV.softmax(-1)
        logits_BV = logits_BV.masked_fill(probs < min_p_B[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits_BV


def sample_from_probs(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with one given uniform per row: the first token whose cumulative mass exceeds u·total.

    Searching with right=True never lands on a zero-probability token (the CDF does not rise there).
    """
    cdf = probs_BV.cumsum(-1)
    target = (uniform_B.to(cdf) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs_BV.shape[1] - 1)


def _tempered(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Sampled rows' logits after temperature, top-k, top-p and min-p (-inf where removed)."""
    device = logits_BV.device
    x = logits_BV / torch.tensor([p.temperature for p in params], device=device)[:, None]
    return mask_logits(
        x,
        torch.tensor([p.top_k for p in params], device=device),
        torch.tensor([p.top_p for p in params], device=device),
        torch.tensor([p.min_p for p in params], device=device),
    )


def probs_of(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[B, V] the distribution each row's next token is drawn from, as `sample` draws it: one-hot at the argmax for
    greedy rows, else the softmax after temperature, top-k, top-p and min-p. (No repetition penalty or grammar mask:
    speculative decoding, which needs whole distributions, leaves such rows to `sample`.)"""
    logits = logits_BV.float()
    out = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        out.index_copy_(0, idx, _tempered(logits.index_select(0, idx), [params[i] for i in rows]).softmax(-1))
    return out


@dataclass
class Sampled:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] logprob of the chosen token under the raw model distribution
    top_ids: torch.Tensor | None = None  # [B, n] the n most likely tokens (n = the batch's largest request)
    top_logprobs: torch.Tensor | None = None  # [B, n]


def sample(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen_BV: torch.Tensor | None = None,
    allowed_BV: torch.Tensor | None = None,
) -> Sampled:
    """Next token for every row, each with its own params; `seen_BV` (bool) marks prompt+output tokens for the
    repetition penalty and is only read when some row has one; `allowed_BV` (bool), where given, is the only tokens
    a row may take (structured output's grammar mask)."""
    device = logits_BV.device
    logits = logits_BV.float()
    want = [p.logprobs for p in params if p.logprobs is not None]
    raw = logits.log_softmax(-1) if want else None  # before the grammar mask: logprobs are the model's own
    if allowed_BV is not None:
        logits = logits.masked_fill(~allowed_BV, float("-inf"))
    out = Sampled(token_ids=logits.argmax(-1))  # overwritten below where a penalty or sampling applies
    if want and max(want):
        out.top_logprobs, out.top_ids = raw.topk(max(want), dim=-1)
    # chosen-token logprobs are gathered at the end, once the tokens are known
    penalty = [p.repetition_penalty for p in params]
    if any(x != 1.0 for x in penalty):
        assert seen_BV is not None, "repetition_penalty needs the seen-token mask"
        logits = apply_repetition_penalty(logits, seen_BV, torch.tensor(penalty, device=device))
        out.token_ids = logits.argmax(-1)

    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=device)
        x = _tempered(logits.index_select(0, idx), [params[i] for i in rows])
        uniform = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(device)
        out.token_ids = out.token_ids.index_copy(0, idx, sample_from_probs(x.softmax(-1), uniform))
    if want:
        out.logprobs = raw.gather(1, out.token_ids[:, None]).squeeze(1)
    return out


# --- text: incremental detokenization with stop strings -----------------------------------------------------------
class TextTracker:
    """Turns a stream of token ids into text deltas that are safe to show.

    Incremental decoding (vLLM's scheme): decode a short window of ids twice, without and with the new token, and
    emit the difference. Starting the window a few tokens back (the prompt's tail at first) keeps tokenizers
    that drop a leading space at the start of a decode (SentencePiece) right; an ending U+FFFD means the token
    split a UTF-8 character, so we wait for the rest. Cost per token: one decode of a handful of ids.

    Stop strings: the search runs only over the new text plus the last len(longest stop)-1 characters, and the
    same number of characters is held back from the deltas, since they may turn out to be the start of a stop
    string. The final text is cut right before the first stop string.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to turn tokens into text; pass one, or use stop_token_ids")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = list(prompt_ids[-4:])  # decoding context: the prompt's last few tokens
        self.prefix, self.read = 0, len(self.ids)
        self.text = ""  # all output text so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out as deltas

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (delta text now safe to show, whether a stop string appeared)."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before) :]
            # Slide the window: the ids before the new prefix are never decoded again.
            self.ids = self.ids[self.read :]
            self.prefix, self.read = 0, len(self.ids)
            search_from = max(0, len(self.text) - self.hold)
            self.text += new
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent : safe], safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet handed out (call when the request ends)."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


@dataclass
class StreamEvent:
    """One generated token as a stream sees it. The last event of a request has `finish_reason` set."""

    token_id: int | None
    text: str  # new text (already stop-string safe; may be "" while a character or stop string is pending)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event
    # On a request's first event, with params.prompt_logprobs: per prompt token, (logprob given the tokens before it,
    # top n), None for the first token (nothing comes before it)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


def default_stop_ids(model_config: Any, tokenizer: Any) -> set[int]:
    """Ids that end a generation by default: the tokenizer's (EOS, and `<|end|>` for deepsail chat tokenizers)
    plus the model config's eos_token_id."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "stop_ids", None) or [])
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
    eos = getattr(model_config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return ids


@dataclass
class DecodeState:
    """One request's output so far, and the rules that end it."""

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Any = None
    eos_ids: set[int] = field(default_factory=set)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.text_tracker = TextTracker(self.tokenizer, self.prompt_ids, self.params.stop)
        scored = self.params.prompt_logprobs is not None
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = (
            [None] * len(self.prompt_ids) if scored else None
        )
        # Beside each scored prompt token: the entropy (nats) of the model's distribution at the position before it,
        # its uncertainty there whatever the token was. The edge/cloud router reads its mean (serve/route.py).
        self.prompt_entropy: list[float | None] | None = [None] * len(self.prompt_ids) if scored else None
        self.generator = None if self.params.greedy else self.params.make_generator()
        self.stops = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_ids))
        self._seen: torch.Tensor | None = None
        self.grammar = None  # structured output: the request's position in its JSON grammar (infer/structured.py)
        if self.params.json_schema is not None:
            from deepsail.infer.structured import Grammar

            if self.tokenizer is None:
                raise ValueError("structured output needs a tokenizer: the grammar is over the tokens' bytes")
            self.grammar = Grammar(self.params.json_schema, self.tokenizer, self.stops)

    @property
    def text(self) -> str:
        return self.text_tracker.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def seen(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[V] bool: tokens in the prompt or output (kept up to date by `append`), for the repetition penalty."""
        if self._seen is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in self.prompt_ids + self.output_ids if i < vocab_size]
            self._seen[torch.tensor(ids, dtype=torch.long, device=device)] = True
        return self._seen

    def append(
        self, token_id: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None
    ) -> StreamEvent:
        assert not self.done, "request already finished"
        self.output_ids.append(token_id)
        if self._seen is not None and token_id < self._seen.numel():
            self._seen[token_id] = True
        if self.params.logprobs is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top or [])
        if token_id in self.stops:  # the stop token ends the request; its own text is not part of the output
            self.finish_reason = FINISH_STOP
            delta = self.text_tracker.flush()
        else:
            delta, hit = self.text_tracker.add(token_id)
            if self.grammar is not None:
                self.grammar.consume(token_id)
                hit = self.grammar.complete  # the JSON is closed: nothing may follow
            if hit:
                self.finish_reason = FINISH_STOP
                delta += self.text_tracker.flush() if self.grammar is not None else ""
            elif len(self.output_ids) >= self.params.max_tokens:
                self.finish_reason = FINISH_LENGTH
                delta += self.text_tracker.flush()
        return StreamEvent(token_id, delta, logprob, top, self.finish_reason)


def sample_states(logits_BV: torch.Tensor, states: Sequence[DecodeState]) -> list[StreamEvent]:
    """Sample one token for each state's row of `logits_BV`, append it, and return the events. One place that
    turns `Sampled` tensors into Python values: a single device->host copy per field, then O(batch) Python."""
    params = [s.params for s in states]
    seen = None
    if any(p.repetition_penalty != 1.0 for p in params):
        V, dev = logits_BV.shape[1], logits_BV.device
        seen = torch.stack([s.seen(V, dev) for s in states])
    allowed = None
    if any(s.grammar is not None for s in states):
        from deepsail.infer.structured import allowed_tokens

        allowed = allowed_tokens([s.grammar for s in states], logits_BV.shape[1], logits_BV.device)
    out = sample(logits_BV, params, [s.generator for s in states], seen, allowed)
    tokens = out.token_ids.tolist()
    lps = out.logprobs.tolist() if out.logprobs is not None else None
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    events = []
    for b, state in enumerate(states):
        n = state.params.logprobs or 0
        top = list(zip(top_ids[b][:n], top_lps[b][:n])) if n and top_ids is not None else None
        events.append(state.append(tokens[b], lps[b] if lps is not None else None, top))
    return events
