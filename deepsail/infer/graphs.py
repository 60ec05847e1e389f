"""The decode step compiled once and replayed: every layer, MLA's absorbed attention over the paged cache, the MoE
routing and experts, the head — one torch.compile graph instead of ~2,000 eager aten calls per token.

    step = CompiledDecode(model)            # nothing compiles until the first decode step
    logits = step(ids_B1, cache)            # [B, V], cache.lens advanced; None where it does not apply (eager then)

The graph takes what varies as tensors: the tokens and the eager forward's own attention context (each row's
rotary angles, the pool slot it writes, the slots and mask of every key position), made outside the graph. The key
length L and the batch size are dynamic dims, so a conversation growing token by token replays one graph (batch 1
and batch >= 2 are two, as PyTorch specialises size 1; where few-row products take the weight-major route, batches
of 2..SMALL_ROWS and larger ones are two more). The MoE layers take the gather route (`Experts.gathered`:
each token through its own top-k experts, static shapes), and few-row products the weight-major route `Linear`
takes eagerly.

It applies to a plain model in eval mode (no LoRA, no quantized layers: their wrappers are their own code) when
every row feeds exactly one token; anything else (a prefill, a finished row feeding nothing) runs eager, and a
full cache raises the eager forward's overflow error. Greedy output is identical to eager (tests/test_generate.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsail.model.attention import AttentionContext
from deepsail.model.cache import KVCache
from deepsail.model.layers import weight_major_wins


def _plain(model: nn.Module) -> bool:
    """Only the model's own modules (a LoRA or quantized wrapper is another package's code, and stays eager)."""
    return all(type(m).__module__.startswith(("deepsail.model", "torch.nn")) for m in model.modules())


def _step(model: nn.Module, ids_B1: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    x = model.embed_tokens(ids_B1)
    for block in model.layers:
        x = block(x, ctx)
    return model.logits_of(x)[:, -1]


class CompiledDecode:
    """See the module docstring. One per model; `__call__` returns None where the compiled step does not apply."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ok = _plain(model)
        self._compiled: Any = None
        self._marked_pool: Any = None
        self.steps = 0  # decode steps that ran compiled (for tests and benchmarks)

    def applies(self, ids: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None) -> bool:
        return (
            self.ok
            and cache is not None
            and ids.shape[1] == 1
            and not self.model.training
            and not torch.is_grad_enabled()
            and (input_lens is None or bool((input_lens == 1).all()))
            and int(cache.lens.min()) > 0  # something cached in every row: a decode step, not a prefill
        )

    def __call__(
        self, ids_B1: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if not self.applies(ids_B1, cache, input_lens):
            return None
        # The context is the eager forward's own (positions, slots, mask; a full cache raises its overflow error),
        # made outside the graph: its sizes come from the cache's lengths.
        ctx = self.model.attention_context(ids_B1.shape[0], 1, ids_B1.device, cache, None)
        if self._compiled is None:
            weight_major_wins()  # measured eagerly, read by the traced code
            self._compiled = torch.compile(_step, dynamic=False)
        torch._dynamo.mark_dynamic(ctx.read_slots, 1)  # the key length: one graph as the context grows
        torch._dynamo.mark_dynamic(ctx.mask, 3)
        if cache.pool is not self._marked_pool:  # and one for every pool size (each generate() makes its own)
            for store in cache.pool.k + (cache.pool.v or []):
                torch._dynamo.mark_dynamic(store, 0)
            self._marked_pool = cache.pool
        if ids_B1.shape[0] > 1:
            # maybe_: the batch dim may be specialised into ranges (few-row products take the weight-major route up
            # to SMALL_ROWS rows where it wins, `layers.linear`), giving a graph per range; mark_dynamic would make
            # that guard an error (ConstraintViolationError at batch 64 in GRPO rollouts, on this Intel CPU).
            for t in (ids_B1, ctx.cos, ctx.sin, ctx.write_slots, ctx.write_rows, ctx.read_slots, ctx.mask):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        logits = self._compiled(self.model, ids_B1, ctx)
        cache.lens += 1
        self.steps += 1
        return logits


def enable_compiled_decode(model: nn.Module) -> CompiledDecode:
    """Make `decode_logits` (generate, the engine) run `model`'s decode steps compiled from now on."""
    step = getattr(model, "compiled_decode", None)
    if step is None:
        step = CompiledDecode(model)
        model.compiled_decode = step
    return step


def decode_logits(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, input_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, V] next-token logits after feeding `ids` into `cache`: the compiled step where it is enabled and applies,
    else the eager model (the same numbers: greedy output is identical)."""
    step = getattr(model, "compiled_decode", None)
    logits = step(ids, cache, input_lens) if step is not None else None
    if logits is None:
        logits = model(ids, cache=cache, input_lens=input_lens, last_logits_only=True).logits[:, 0]
    return logits
