"""Structured output: a request's tokens constrained to JSON that matches a schema, as a token mask in the sampler.

    params = SamplingParams(json_schema='{"type": "object", "properties": {"n": {"type": "integer"}}}')
    engine.submit(ids, params)        # or generate(...): every sampled token keeps the text a valid JSON prefix

Each constrained request carries its own matcher (`Grammar`, in its `DecodeState`); before each sampling step
`allowed_tokens` asks every constrained row's matcher for its bitmask of allowed next tokens (one int32 per 32 ids,
filled in native code, off the GIL), unpacks them with tensor ops into a [B, V] bool mask, and the sampler sets the
rest to -inf. After a token is chosen the state feeds it to its matcher. No Python runs over the vocabulary.

The grammar engine is llguidance (the `structured` extra). Per-token cost on this 2-core CPU (load 4), a nested 6-field
schema / "any JSON object", 32k-token byte-level BPE, medians of 5 random walks of up to 150 tokens
(`python benchmarks/grammar_bench.py`):

    engine          mask fill       consume         compile               installs
    llguidance      29 / 20 us      8 / 10 us       1.4 / 0.6 ms          itself (3 MB, no dependencies)
    xgrammar        14 / 23 us      5 / 11 us       8.8 / 0.8 ms          + triton, apache-tvm-ffi, transformers
    outlines-core    6 / 72 us     16 / 298 us      149 ms / 5.0 s        itself

All three are far below a decode step on CPU (5 ms for 32 rows of the tiny debug model, 70 ms on deepseek-v3-small),
so the mask is not what a request waits on: the engine runs json_schema requests at 0.85x plain tok/s on the debug
model and within noise (1.11x) on deepseek-v3-small, batch 32. llguidance wins on what it brings along (xgrammar
pulls triton into a CPU install), on compiling any schema in about a millisecond (outlines-core's regex DFA for "any
JSON object" took 5 s) and on refusing keywords it does not implement by name ("not", "if", look-around in a
pattern) instead of ignoring them.

Output is compact JSON (no whitespace between tokens of the grammar): a model, and certainly a random one, cannot
then spend its tokens on indentation. When the grammar is complete the request ends with "stop"; if max_tokens runs
out first it ends with "length" and the text is a valid *prefix* of such JSON, not a document (OpenAI's JSON mode
behaves the same) — clients check finish_reason.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

JSON_OBJECT = '{"type": "object"}'  # response_format {"type": "json_object"}: any JSON object
MAX_SCHEMA_BYTES = 64 << 10  # a schema is compiled on the request path: bound it
# Compact JSON: "," and ":" with no whitespace around them. Flexible whitespace lets a weak model fill max_tokens with
# newlines (xgrammar's any_whitespace default is a known source of that in vLLM).
_COMPILE_OPTIONS = {"whitespace_flexible": False}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError(
            "structured output (response_format json_object / json_schema) needs llguidance: "
            "pip install 'deepsail[structured]'"
        ) from None
    return llguidance


@functools.lru_cache(maxsize=256)
def compile_schema(schema_json: str) -> str:
    """The llguidance grammar for a JSON schema given as JSON text; ValueError naming what is wrong or unsupported.
    Cached: clients repeat the same schema."""
    llg = _llguidance()
    if len(schema_json.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise ValueError(f"JSON schema is {len(schema_json):,} characters; at most {MAX_SCHEMA_BYTES:,} bytes")
    try:
        schema = json.loads(schema_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_json, defaults=_COMPILE_OPTIONS)
    except ValueError as e:
        raise ValueError(f"JSON schema not supported: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"JSON schema not supported: {messages[0]}")
    return grammar


# One llguidance tokenizer per (tokenizer, stop ids): building it reads the whole vocabulary (14 ms for 512 tokens,
# 60 ms for 32k), so it is made once and shared by every request with that tokenizer.
_VOCABS: weakref.WeakKeyDictionary[Any, dict[frozenset[int], Any]] = weakref.WeakKeyDictionary()


def _vocab(tokenizer: Any, stop_ids: Iterable[int]) -> Any:
    backend = getattr(tokenizer, "_tok", None)  # deepsail's Tokenizer wraps an HF `tokenizers.Tokenizer`
    if backend is None:
        raise ValueError(
            "structured output needs the model's deepsail Tokenizer (tokenizer.json) to know each token's bytes"
        )
    stops = frozenset(stop_ids)
    if not stops:
        raise ValueError("structured output needs a stop token (EOS) to end the JSON with; the tokenizer has none")
    per = _VOCABS.setdefault(tokenizer, {})
    if stops not in per:
        llg = _llguidance()
        per[stops] = llg.LLTokenizer(backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=sorted(stops))
    return per[stops]


class Grammar:
    """One request's position in its grammar: which tokens may come next, and feeding it the chosen ones."""

    def __init__(self, schema_json: str, tokenizer: Any, stop_ids: Iterable[int]) -> None:
        llg = _llguidance()
        vocab = _vocab(tokenizer, stop_ids)
        self.vocab_size = vocab.vocab_size
        self.matcher = llg.LLMatcher(vocab, compile_schema(schema_json), log_level=0)
        assert not self.matcher.is_error(), self.matcher.get_error()

    def consume(self, token_id: int) -> None:
        ok = self.matcher.consume_token(token_id)
        assert ok, f"the sampler chose token {token_id}, which the grammar's mask forbids: {self.matcher.get_error()}"

    def allows(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids`, in order, the grammar accepts from here (without consuming them)."""
        return self.matcher.validate_tokens(list(token_ids))

    def rollback(self, n: int) -> None:
        if n:
            assert self.matcher.rollback(n), self.matcher.get_error()

    @property
    def complete(self) -> bool:
        """The JSON is finished and nothing may follow (the request ends with "stop")."""
        return self.matcher.is_stopped()


@functools.cache
def _executor() -> Any:
    # Fills the rows' bitmasks in native threads (80% of the cores, at most 32), releasing the GIL meanwhile.
    return _llguidance().LLExecutor()


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(grammars: Sequence[Grammar | None], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, vocab_size] bool: which tokens each row may sample next (all, for a row without a grammar); None when no
    row has one. Ids past the tokenizer's vocabulary (a model padded to a multiple of 64) are never allowed."""
    rows = [(g.matcher, i) for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    n_tok = next(g.vocab_size for g in grammars if g is not None)
    words = (n_tok + 31) // 32
    bits = torch.full((len(grammars), words), -1, dtype=torch.int32)  # all allowed: rows without a grammar
    _executor().unsafe_compute_mask_ptr(rows, bits.data_ptr(), words * 4, len(grammars))
    allowed = ((bits[:, :, None] >> _BITS) & 1).bool().view(len(grammars), -1)[:, :vocab_size]  # bit j of word w: 32w+j
    if allowed.shape[1] < vocab_size:  # the model's padding ids: only unconstrained rows may have them
        free = torch.tensor([g is None for g in grammars])[:, None]
        allowed = torch.cat((allowed, free.expand(-1, vocab_size - allowed.shape[1])), 1)
    return allowed.to(device, non_blocking=True)
