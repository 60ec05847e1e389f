"""Batched generation with the paged KV cache: sampling, beam search, context-aware and speculative decoding.

    model, tok = load("runs/base")                    # an HF dir, or a training run folder (latest checkpoint)
    out = generate(model, tok, ["The capital of France is"], max_tokens=32, temperature=0)
    print(out[0].text)

How a batch runs: prompts are right-padded into one [B, T] tensor and prefilled in one forward
(`input_lens` tells the model where each row's real tokens end, `last_logits_only` keeps only the logits a
sampler needs); every later step feeds one token per live row. A finished row stays in the batch with
`input_lens = 0`, which neither writes its cache nor advances it, so the other rows never notice.

This is the simple, static-batch path (a fixed set of prompts, start to finish). The server uses the
continuous-batching `Engine` in `engine.py`, which shares the sampler and stop rules in `sampling.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepsail.infer.batching import Prompt, check_fits, encode_prompt, model_device, pad_rows
from deepsail.infer.graphs import decode_logits
from deepsail.infer.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeState,
    SamplingParams,
    StreamEvent,
    default_stop_ids,
    sample_states,
)
from deepsail.infer.speculative import speculative_decode
from deepsail.model import KVCache, Transformer
from deepsail.precision import resolve_device, resolve_precision, to_dtype


@dataclass
class Generation:
    """One prompt's result."""

    token_ids: list[int]  # generated ids (a stop token that ended the request included)
    text: str  # generated text ("" without a tokenizer), cut before any stop string
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[float] | None = None  # per generated token, when params.logprobs is set
    top_logprobs: list[list[tuple[int, float]]] | None = None
    score: float | None = None  # beam search: sum of logprobs / generated_len ** length_penalty
    draft_tokens: int = 0  # speculative decoding: tokens the MTP head proposed
    accepted_tokens: int = 0  # ... and how many of them the main model confirmed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


# --- loading ---------------------------------------------------------------------------------------------------------
def load(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> tuple[Transformer, Any]:
    """(model in eval mode, tokenizer or None) from an HF dir or a run folder (its latest checkpoint). `device` and
    `dtype` take deepsail's words (auto: CUDA in bf16 when there is a GPU, else CPU in fp32)."""
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.train.checkpoint import resolve_checkpoint
    from deepsail.tune.load import from_pretrained  # a LoRA adapter folder brings its base along

    folder = resolve_checkpoint(path)
    device = resolve_device(device)
    dtype = to_dtype(resolve_precision(dtype, device, inference=True))
    model = from_pretrained(folder, dtype=dtype, device=device).eval()
    for where in (folder, Path(getattr(model, "name_or_path", folder))):
        if (where / "tokenizer.json").is_file():
            return model, Tokenizer.load(where)
    return model, None


def _to_generation(state: DecodeState) -> Generation:
    return Generation(
        token_ids=list(state.output_ids),
        text=state.text,
        finish_reason=state.finish_reason or FINISH_LENGTH,
        prompt_tokens=len(state.prompt_ids),
        logprobs=list(state.logprobs) if state.params.logprobs is not None else None,
        top_logprobs=list(state.top_logprobs) if state.params.logprobs is not None else None,
    )


# --- the sampling loop ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _decode(
    model: Transformer, rows: list[list[int]], states: list[DecodeState], cad_alpha: float | None = None
) -> Iterator[list[tuple[int, StreamEvent]]]:
    """Yields, per step, (state index, event) for every state that got a token.

    Context-aware decoding: `rows` holds 2B sequences, [context + prompt] * B then [prompt] * B, and the sampled
    logits are (1+α)·l(y|c,x) − α·l(y|x) (Shi et al. 2023). The sampled token is appended to both rows of its
    pair.
    """
    B, R = len(states), len(rows)
    device = model_device(model)
    max_new = max(s.params.max_tokens for s in states)
    cache = model.new_cache(R, max(len(r) for r in rows) + max_new)
    ids, lens = pad_rows(rows, device)
    logits = model(ids, cache=cache, input_lens=lens, last_logits_only=True).logits[:, 0]
    while True:
        if cad_alpha is not None:
            logits = (1 + cad_alpha) * logits[:B].float() - cad_alpha * logits[B:].float()
        alive = [b for b in range(B) if not states[b].done]
        events = sample_states(logits[torch.tensor(alive, device=device)], [states[b] for b in alive])
        yield list(zip(alive, events))
        still = [b for b in alive if not states[b].done]
        if not still:
            return
        tokens = torch.zeros(B, dtype=torch.long)
        tokens[alive] = torch.tensor([e.token_id for e in events])
        feed = torch.zeros(B, dtype=torch.long)
        feed[still] = 1
        if cad_alpha is not None:
            tokens, feed = tokens.repeat(2), feed.repeat(2)
        logits = decode_logits(model, tokens[:, None].to(device), cache, feed.to(device))


def stream(
    model: Transformer, tokenizer: Any, prompt: Prompt, params: SamplingParams | None = None, **sampling: Any
) -> Iterator[StreamEvent]:
    """One prompt, token by token (what `deepsail generate` and `deepsail chat` print)."""
    params = params or SamplingParams(**sampling)
    ids = encode_prompt(tokenizer, prompt)
    check_fits(model, [ids], params.max_tokens)
    state = DecodeState(ids, params, tokenizer, default_stop_ids(model.config, tokenizer))
    for step in _decode(model.eval(), [ids], [state]):
        for _, event in step:
            yield event


def generate(
    model: Transformer,
    tokenizer: Any,
    prompts: Prompt | Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    context: Prompt | Sequence[Prompt] | None = None,
    cad_alpha: float = 0.0,
    speculative: int = 0,
    **sampling: Any,
) -> list[Generation]:
    """Generate for a batch of prompts (text or token ids); one `Generation` per prompt, in order.

    params: one `SamplingParams` for all prompts, one per prompt, or keyword arguments for one
        (`max_tokens=32, temperature=0.7, top_p=0.9, seed=0, stop=["\\n"], logprobs=5, ...`).
    num_beams > 1: beam search (deterministic; uses max_tokens, stop_token_ids/EOS; stop strings cut the result).
    context, cad_alpha: context-aware decoding — each prompt is generated from context + prompt with logits
        (1+α)·l(y|context,prompt) − α·l(y|prompt); α=0 is plain decoding of context + prompt.
    speculative = k > 0: self-speculative greedy decoding, k tokens drafted per step by the MTP head
        (DeepSeek-V3-style models); the output equals plain greedy, and each result reports its acceptance.
    """
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # a single prompt
    if not prompts:
        raise ValueError("no prompts given")
    if params is not None and sampling:
        raise ValueError(f"pass either params= or sampling keywords ({', '.join(sampling)}), not both")
    if params is None:
        params = SamplingParams(**sampling)
    per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    model.eval()
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    eos = default_stop_ids(model.config, tokenizer)

    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams}: must be at least 1")
    if sum([num_beams > 1, context is not None, speculative > 0]) > 1:
        raise ValueError("choose one of beam search, context-aware decoding and speculative decoding per call")
    if num_beams > 1:
        if any(p != per_prompt[0] for p in per_prompt):
            raise ValueError("beam search takes one SamplingParams for the whole batch")
        check_fits(model, rows, per_prompt[0].max_tokens)
        return beam_search(model, tokenizer, rows, per_prompt[0], num_beams, length_penalty, eos)

    states = [DecodeState(r, p, tokenizer, eos) for r, p in zip(rows, per_prompt)]
    if speculative > 0:
        check_fits(model, rows, max(p.max_tokens for p in per_prompt), extra=speculative + 1)
        draft, accepted = speculative_decode(model, rows, states, speculative)
        results = [_to_generation(s) for s in states]
        for g, d, a in zip(results, draft, accepted):
            g.draft_tokens, g.accepted_tokens = d, a
        return results

    cad = None
    if context is not None:
        contexts = (
            [context] * len(rows)
            if isinstance(context, str) or (isinstance(context, Sequence) and context and isinstance(context[0], int))
            else list(context)
        )
        if len(contexts) != len(rows):
            raise ValueError(f"got {len(contexts)} contexts for {len(rows)} prompts")
        with_context = [encode_prompt(tokenizer, c) + r for c, r in zip(contexts, rows)]
        # Stop rules and the repetition penalty see the full with-context sequence.
        states = [DecodeState(wc, p, tokenizer, eos) for wc, p in zip(with_context, per_prompt)]
        rows, cad = with_context + rows, float(cad_alpha)
    check_fits(model, rows, max(p.max_tokens for p in per_prompt))
    for _ in _decode(model, rows, states, cad_alpha=cad):
        pass
    return [_to_generation(s) for s in states]


# --- beam search -----------------------------------------------------------------------------------------------------
def _copy_rows(cache: KVCache, src_R: torch.Tensor) -> None:
    """Row r of the cache becomes a copy of row src_R[r], in every layer.

    Relies on `new_cache`'s layout (row r owns one contiguous run of slots). Copying the cache is O(cache) per
    step, as in HF; sharing blocks copy-on-write (as the engine shares prefixes) would avoid it, at the cost of
    an allocator here too.
    """
    R = cache.block_table.shape[0]
    if torch.equal(src_R.cpu(), torch.arange(R)):
        return
    src = src_R.to(cache.lens.device)
    for store in cache.pool.stores():
        rows = store.view(R, -1, *store.shape[1:])
        rows.copy_(rows.index_select(0, src))


@torch.inference_mode()
def beam_search(
    model: Transformer,
    tokenizer: Any,
    prompts: list[list[int]],
    params: SamplingParams,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_ids: set[int] | None = None,
) -> list[Generation]:
    """HF-style beam search: keep the `num_beams` best partial sequences by summed logprob; a beam that emits a
    stop token becomes a finished hypothesis scored sum_logprobs / generated_len ** length_penalty (>1 favours
    longer, <1 shorter); a prompt is done when it has num_beams hypotheses and no live beam can beat the worst."""
    W, B = num_beams, len(prompts)
    R, V = B * W, model.config.vocab_size
    device = model_device(model)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids or ()))
    cache = model.new_cache(R, max(len(p) for p in prompts) + params.max_tokens)

    # Prefill each prompt once (through a view of its first beam's row), then copy that row to its other beams.
    first = torch.arange(B, device=device) * W
    view = KVCache(cache.pool, cache.block_table[first], torch.zeros(B, dtype=torch.long, device=device))
    ids, lens = pad_rows(prompts, device)
    logits = model(ids, cache=view, input_lens=lens, last_logits_only=True).logits[:, 0]
    _copy_rows(cache, first.repeat_interleave(W))
    cache.lens.copy_(lens.repeat_interleave(W))
    logprobs = logits.float().log_softmax(-1).repeat_interleave(W, 0)  # [R, V]

    # At the first step all W beams of a prompt are the same sequence; only beam 0 may expand, or the top
    # candidates would be W copies of each token.
    scores = torch.full((B, W), float("-inf"), device=device)
    scores[:, 0] = 0.0
    beams: list[list[list[int]]] = [[[] for _ in range(W)] for _ in range(B)]
    hyps: list[list[tuple[float, list[int], str]]] = [[] for _ in range(B)]
    done = [False] * B
    n_cand = min(W * (1 + len(stops)), W * V)  # enough that W of them are not stop tokens
    for step in range(params.max_tokens):
        gen_len = step + 1
        cand = (scores.view(R, 1) + logprobs).view(B, W * V)
        top_scores, top_idx = (t.tolist() for t in cand.topk(n_cand, dim=1))
        parent = list(range(R))
        next_tokens, next_scores = [0] * R, [float("-inf")] * R
        for b in range(B):
            if done[b]:
                continue
            chosen: list[tuple[float, int, int]] = []
            for rank, (s, i) in enumerate(zip(top_scores[b], top_idx[b])):
                w, tok = divmod(i, V)
                if tok in stops:
                    if rank < W:  # a stop only counts if it is among the W best continuations
                        hyps[b].append((s / gen_len**length_penalty, beams[b][w] + [tok], FINISH_STOP))
                    continue
                chosen.append((s, w, tok))
                if len(chosen) == W:
                    break
            hyps[b] = sorted(hyps[b], key=lambda h: h[0], reverse=True)[:W]
            new_beams = []
            for k, (s, w, tok) in enumerate(chosen):
                parent[b * W + k] = b * W + w
                next_tokens[b * W + k], next_scores[b * W + k] = tok, s
                new_beams.append(beams[b][w] + [tok])
            beams[b] = new_beams
            best_live = chosen[0][0] / gen_len**length_penalty
            if len(hyps[b]) == W and hyps[b][-1][0] >= best_live:
                done[b] = True
        if step == params.max_tokens - 1 or all(done):
            break
        _copy_rows(cache, torch.tensor(parent))
        scores = torch.tensor(next_scores, device=device).view(B, W)
        feed = torch.tensor([0 if done[r // W] else 1 for r in range(R)], device=device)
        tokens = torch.tensor(next_tokens, device=device)[:, None]
        logits = model(tokens, cache=cache, input_lens=feed, last_logits_only=True).logits[:, 0]
        logprobs = logits.float().log_softmax(-1)

    results = []
    for b in range(B):
        if not done[b]:  # out of tokens: the live beams compete with the finished ones
            for k in range(W):
                s = next_scores[b * W + k]
                hyps[b].append((s / params.max_tokens**length_penalty, beams[b][k], FINISH_LENGTH))
        score, ids_, reason = max(hyps[b], key=lambda h: h[0])
        text_ids = ids_[:-1] if reason == FINISH_STOP else ids_
        text = tokenizer.decode(text_ids, skip_special_tokens=True) if tokenizer is not None else ""
        cut = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if cut:
            text, reason = text[: min(cut)], FINISH_STOP
        results.append(Generation(ids_, text, reason, len(prompts[b]), score=score))
    return results
