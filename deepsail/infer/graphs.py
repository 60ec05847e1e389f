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

Speculative decoding (generate's and the engine's) runs through two more graphs of the same kind: `hidden`, rows
of up to MAX_TOKENS tokens each (the verify forward over [t_n, d_1..d_k]) -> the last block's output, and `mtp`,
the MTP module's catch-up and drafting steps. Each new feed length T is one more graph (k + 1 and 1 in practice).

It applies to a plain model in eval mode (no LoRA, no quantized layers: their wrappers are their own code) in the
decode phase: something cached in every row and a short feed (a prefill runs eager), and a full cache raises the
eager forward's overflow error. Greedy output, speculative included, is identical to eager (tests/test_generate.py;
hybrid sparse attention: tests/test_sparse_attention.py). A hybrid model's paged path (model/sparse_attention.py)
reads the rows' pages and lengths inside the graph, and every size in it follows from the key length, so it too
keeps one graph as the context grows: deepseek-v3-mini-dense's width, batch 1, fp32, compiled vs eager 2.2 vs 6.2
ms/token at 1k tokens and 2.7 vs 7.3 ms at 16k (dense compiled: 2.0 and 11.4 ms), after a ~27 s first compile.
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


# Rows feeding at most this many tokens each (a speculative verify of k drafts, the MTP's catch-up over them) run
# through the token graphs; a longer feed is a prefill and runs eager.
MAX_TOKENS = 8


def _hidden(model: nn.Module, ids_BT: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    x = model.embed_tokens(ids_BT)
    for block in model.layers:
        x = block(x, ctx)
    return x


def _step(model: nn.Module, ids_B1: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    return model.logits_of(_hidden(model, ids_B1, ctx))[:, -1]


def _mtp(model: nn.Module, hidden_BTD: torch.Tensor, next_BT: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    return model.mtp[0](hidden_BTD, model.embed_tokens(next_BT), ctx)


class CompiledDecode:
    """See the module docstring. One per model; each call returns None where its graph does not apply (eager then).

    `__call__`: one token per row -> next-token logits [B, V] (plain decoding). `hidden`: up to MAX_TOKENS per row
    -> the last block's output [B, T, D] (speculation's verify). `mtp`: the MTP module's catch-up -> its states."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Hybrid sparse attention compiles through its paged decode (sparse_attention.py: `paged`), whose sizes all
        # follow from the key length; where the pool keeps no pooled blocks (page and block sizes that do not
        # divide) it would re-pool the history with sizes taken from the lengths' values, so that stays eager.
        self.ok = _plain(model)
        self.hybrid = getattr(model.config, "sparse_attention", "none") == "hybrid"
        self._graphs: dict[str, Any] = {}
        self._marked_pool: Any = None
        self.runs = {"step": 0, "hidden": 0, "mtp": 0}  # forwards each graph ran (for tests and benchmarks)

    def applies(self, ids: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None) -> bool:
        """A decode-phase forward: something cached in every row, every row one token (`__call__`) or a few."""
        return (
            self.ok
            and cache is not None
            and ids.shape[1] <= MAX_TOKENS
            and not self.model.training
            and not torch.is_grad_enabled()
            and int(cache.lens.min()) > 0  # not a prefill
            and (not self.hybrid or cache.pool.kc is not None)
        )

    def __call__(
        self, ids_B1: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        one = ids_B1.shape[1] == 1 and (input_lens is None or bool((input_lens == 1).all()))
        if not one or not self.applies(ids_B1, cache, input_lens):
            return None
        return self._run("step", _step, ids_B1, cache, input_lens)

    def hidden(
        self, ids_BT: torch.Tensor, cache: KVCache | None, input_lens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """[B, T, D] as `model(..., return_hidden=True).hidden`, cache.lens advanced by input_lens (default T)."""
        if not self.applies(ids_BT, cache, input_lens):
            return None
        return self._run("hidden", _hidden, ids_BT, cache, input_lens)

    def mtp(
        self, hidden_BTD: torch.Tensor, next_BT: torch.Tensor, cache: KVCache, lens_B: torch.Tensor
    ) -> torch.Tensor | None:
        """The MTP module's states as `speculative.mtp_catch_up` computes them; the caller advances cache.lens."""
        if len(getattr(self.model, "mtp", ())) == 0 or not self.applies(next_BT, cache, lens_B):
            return None
        return self._run("mtp", _mtp, next_BT, cache, lens_B, hidden_BTD, advance=False)

    def _run(
        self,
        name: str,
        fn: Any,
        ids_BT: torch.Tensor,
        cache: KVCache,
        input_lens: torch.Tensor | None,
        *extra: torch.Tensor,
        advance: bool = True,
    ) -> torch.Tensor:
        B, T = ids_BT.shape
        # The context is the eager forward's own (positions, slots, mask; a full cache raises its overflow error),
        # made outside the graph: its sizes come from the cache's lengths.
        ctx = self.model.attention_context(B, T, ids_BT.device, cache, input_lens)
        if name not in self._graphs:
            weight_major_wins()  # measured eagerly, read by the traced code
            # On CPU the generated code calls its ~60 kernels per step from C++ rather than Python: batch-1 decode
            # of deepseek-v3-small 1.24x faster (alternating runs: 135/117 vs 110/93 tok/s), a first compile ~10 s
            # longer.
            cpu = ids_BT.device.type == "cpu"
            self._graphs[name] = torch.compile(fn, dynamic=False, options={"cpp_wrapper": True} if cpu else None)
        torch._dynamo.mark_dynamic(ctx.read_slots, 1)  # the key length: one graph as the context grows
        torch._dynamo.mark_dynamic(ctx.mask, 3)
        if cache.pool is not self._marked_pool:  # and one for every pool size (each generate() makes its own)
            for store in cache.pool.stores():
                torch._dynamo.mark_dynamic(store, 0)
            self._marked_pool = cache.pool
        if self.hybrid:  # its paged path reads the rows' pages and lengths in the graph (sparse_attention.py)
            torch._dynamo.maybe_mark_dynamic(cache.block_table, 1)  # pages per row: grows with the context
        if B > 1:
            if self.hybrid:
                for t in (cache.block_table, cache.lens, ctx.input_lens):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            # maybe_: the batch dim may be specialised into ranges (few-row products take the weight-major route up
            # to SMALL_ROWS rows where it wins, `layers.linear`), giving a graph per range; mark_dynamic would make
            # that guard an error (ConstraintViolationError at batch 64 in GRPO rollouts, on this Intel CPU).
            for t in (ids_BT, ctx.cos, ctx.sin, ctx.read_slots, ctx.mask, *extra):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if B > 1 or T > 1:  # the tokens written: B x T less the rows' padding
            for t in (ctx.write_slots, ctx.write_rows):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if name == "mtp":
            out = self._graphs[name](self.model, extra[0], ids_BT, ctx)
        else:
            out = self._graphs[name](self.model, ids_BT, ctx)
        if advance:
            cache.lens += T if input_lens is None else input_lens
        self.runs[name] += 1
        return out


def enable_compiled_decode(model: nn.Module) -> CompiledDecode:
    """Make `decode_logits` (generate, the engine) run `model`'s decode steps compiled from now on."""
    step = getattr(model, "compiled_decode", None)
    if step is None:
        step = CompiledDecode(model)
        model.compiled_decode = step
    return step


def compiled_hidden(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, input_lens: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The last block's output [B, T, D] for feeding `ids` (a few tokens per row) into `cache`, from the compiled
    graph where it is enabled and applies; None otherwise (the caller runs its eager forward)."""
    step = getattr(model, "compiled_decode", None)
    return step.hidden(ids, cache, input_lens) if step is not None else None


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
