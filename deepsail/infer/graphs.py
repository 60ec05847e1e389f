"""The decode step compiled once and replayed: every layer, MLA's absorbed attention over the paged cache, the MoE
routing and experts, the head — one torch.compile graph instead of ~2,000 eager aten calls per token.

    step = CompiledDecode(model)            # nothing compiles until the first decode step
    logits = step(ids_B1, cache)            # [B, V], cache.lens advanced; None where it does not apply (eager then)

The graph takes what varies as tensors: the tokens, each row's position (cos/sin are computed inside), the pool
slot each row writes, the slots and mask of every key position. The key length L and the batch size are dynamic
dims, so a conversation growing token by token replays one graph (batch 1 and batch >= 2 are two, as PyTorch
specialises size 1). The MoE layers take the gather route (`Experts.gathered`: each token through its own top-k
experts, static shapes), and few-row products the weight-major route `Linear` takes eagerly.

It applies to a plain model in eval mode (no LoRA, no quantized layers: their wrappers are their own code) when
every row feeds exactly one token into a slot it owns; anything else (prefill, a finished row, a full cache) runs
eager, as `model(...)` would. Greedy output is identical to eager (tests/test_generate.py).
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


def _step(model: nn.Module, ids_B1: torch.Tensor, positions_B1: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    cos, sin = model.rotary(positions_B1)
    ctx.cos, ctx.sin = cos, sin
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
        self.steps = 0  # decode steps that ran compiled (for tests and benchmarks)

    def applies(self, ids: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None) -> bool:
        return (
            self.ok
            and cache is not None
            and ids.shape[1] == 1
            and not self.model.training
            and not torch.is_grad_enabled()
            and (input_lens is None or bool((input_lens == 1).all()))
            and int(cache.lens.min()) > 0  # something cached: a decode step, not a prefill
        )

    def __call__(
        self, ids_B1: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if not self.applies(ids_B1, cache, input_lens):
            return None
        B = ids_B1.shape[0]
        positions = cache.lens[:, None]  # [B, 1]
        write = cache.slots(positions).flatten()
        if bool((write < 0).any()):
            return None  # a row at its capacity: eager raises the overflow error
        L = int(cache.lens.max()) + 1
        keys = torch.arange(L, device=ids_B1.device)
        read = cache.slots(keys.expand(B, L)).clamp(min=0)
        mask = (keys[None] <= positions)[:, None, None]  # [B, 1, 1, L]: each row up to its own position
        rows = torch.arange(B, device=ids_B1.device)
        ctx = AttentionContext(positions, positions, cache, write_slots=write, write_rows=rows)
        ctx.read_slots, ctx.mask, ctx.fresh = read, mask, False
        if self._compiled is None:
            weight_major_wins()  # measured eagerly, read by the traced code
            self._compiled = torch.compile(_step, dynamic=False)
        for t in (read, mask):
            torch._dynamo.mark_dynamic(t, t.dim() - 1)  # the key length: one graph as the context grows
        for store in cache.pool.k + (cache.pool.v or []):
            torch._dynamo.mark_dynamic(store, 0)  # and one for every pool size (each generate() makes its own)
        if B > 1:
            for t in (ids_B1, positions, write, rows, read, mask):
                torch._dynamo.mark_dynamic(t, 0)
        logits = self._compiled(self.model, ids_B1, positions, ctx)
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
