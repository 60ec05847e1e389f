"""Hybrid sparse attention (`ModelConfig.sparse_attention = "hybrid"`): NSA's three branches (DeepSeek's natively
sparse attention, arXiv 2502.11089) mixed by learned per-head sigmoid gates of the layer input.

- window: each query sees its last `sliding_window` keys;
- compressed: each query sees every complete `compress_block`-token block of the past as one pooled key/value
  (learned weights over the block's positions, mean at init);
- selected: each query sees the `select_top_k` complete `select_block`-token blocks its compressed attention
  weighs most (summed over the heads that share keys), among the blocks that start before its window: the window
  already holds the recent ones, so the selected slots go to distant text.

Every branch is causal by position: a compressed or selected block counts only once its last token is at or before
the query, and selection is per query (no query's choice depends on a later query). Keys are addressed by position,
so the same code serves training (the new tokens), prefill and long continuations (the keys gathered from the paged
cache) and gives the same numbers. Each query sees O(window + T/compress_block + top_k·select_block) keys instead
of T. A decode step (`paged`, up to PAGED_QUERIES new tokens per row) reads only those rows: the pool keeps each
block's pooled key and value once the block completes (`write_blocks`, KVPool.kc/vc), so it never re-pools or
gathers the whole history (16k-token decode of deepseek-v3-mini-dense's width: 19.4 ms per token before, 0.65x
the dense model; 7.3 ms now, 1.82x). Every size in that path follows from the key length, never from the lengths'
values, so the compiled decode step (infer/graphs.py) keeps one graph as the context grows: 2.7 ms per token at
16k tokens (dense compiled: 11.4 ms).

MLA runs all three on the absorbed (latent) form — one latent "key head" shared by all query heads, as DeepSeek's
DSA does on MLA's MQA mode — so a selected block is gathered once for all heads and decode reads the cache as is.
On CPU the kernels are blocked SDPA (the window; the selected tiles too when no gradient is needed) and batched
matmuls: flex_attention (compiled) measured 0.135 s vs 0.108 s for the 16k-token window branch, 2.5 s vs 0.80 s
for dense causal, plus an 8 s compile and 1.7 s to build a 16k mask.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import Linear


class AttentionContext(Protocol):
    """What this module reads of attention.py's AttentionContext (not imported: attention.py imports this file)."""

    cos: torch.Tensor
    mask: torch.Tensor | None
    fresh: bool
    past: Any
    cache: Any
    read_slots: torch.Tensor | None
    input_lens: torch.Tensor | None
    scratch: dict[str, Any]


WINDOW_CHUNK = 128  # queries per window chunk: each chunk attends chunk + window keys (16k tokens: 0.108 s at 128,
# 0.120 s at 256 for a 256-key window, 4 heads of 48 on 2 cores)
SCORE_CHUNK = 1024  # queries per compressed-attention chunk: bounds the [heads, chunk, T/compress_block] scores and
# lets a chunk skip the blocks after its last query (causal: ~half the work over a long prefill)


class HybridSparseAttention(nn.Module):
    """The three branches and their gates for one attention layer. Called with the layer's rotated queries and the
    keys/values of every position so far (key index = position)."""

    def __init__(self, config: ModelConfig, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.window, self.compress, self.select = config.sliding_window, config.compress_block, config.select_block
        self.top_k = config.select_top_k
        self.gate_proj = Linear(config.hidden_size, 3 * n_heads, bias=False)  # window, compressed, selected
        # Pooling weights over a compressed block's positions, for keys and values: softmax of these logits (≈ mean at
        # init). Linear in the keys, so pooling the MLA latent equals pooling the keys it expands to.
        self.pool_logits = nn.Parameter(torch.zeros(2, config.compress_block))

    def forward(
        self,
        x_BTD: torch.Tensor,
        q_BHTD: torch.Tensor,
        k_BGLD: torch.Tensor,
        v_BGLV: torch.Tensor | None,
        ctx: AttentionContext,
        scale: float,
        v_dim: int | None = None,
    ) -> torch.Tensor:
        """Attention output [B, H, T, V]. `v_BGLV=None` means the values are the keys' first `v_dim` features (the
        MLA latent). Query t of row b is at position start_b + t, start from `query_starts`."""
        B, T, _ = x_BTD.shape
        start_B = query_starts(ctx, B, T, k_BGLD.shape[2])
        # Fresh text (every row from position 0), decided from shapes: a window at least as long as the text is
        # plain causal attention, and the first max(W, S - 1) queries have no selectable block, so the selected
        # branch runs for the rest only (a training window of <= W tokens: not at all). A deepseek-v3-mini training
        # step at 8x256 tokens, 1 thread: 1.24 -> 0.80 s; 1k-token prefill 1.12x; 2k and longer ~unchanged.
        causal = ctx.fresh and T <= self.window
        w_win = window_attention(q_BHTD, k_BGLD, v_BGLV, start_B, self.window, scale, v_dim, causal=causal)
        kc_BGCD, vc_BGCV = pool_blocks(k_BGLD, _values(k_BGLD, v_BGLV, v_dim), self.pool_logits)
        w_cmp, idx_BGTK, ok_BGTK = self._compressed(q_BHTD, kc_BGCD, vc_BGCV, start_B, ctx, scale)
        t0 = min(T, max(self.window, self.select - 1)) if ctx.fresh else 0
        w_sel = selected_attention(
            q_BHTD[:, :, t0:], k_BGLD, v_BGLV, idx_BGTK[:, :, t0:], ok_BGTK[:, :, t0:], self.select, scale, v_dim
        )
        return self._mix(x_BTD, w_win, w_cmp, w_sel)

    def _compressed(
        self,
        q_BHTD: torch.Tensor,
        kc_BGCD: torch.Tensor,
        vc_BGCV: torch.Tensor,
        start_B: torch.Tensor,
        ctx: AttentionContext,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`compressed_attention` with this layer's sizes; its chunk masks (`score_chunks`) are computed once per
        forward, as every layer masks the same (query, block) pairs."""
        if "score_chunks" not in ctx.scratch:
            T, nC = q_BHTD.shape[2], kc_BGCD.shape[2]
            ctx.scratch["score_chunks"] = score_chunks(start_B, T, nC, self.compress, self.window, self.select)
        return compressed_attention(
            q_BHTD,
            kc_BGCD,
            vc_BGCV,
            start_B,
            self.compress,
            self.window,
            self.select,
            self.top_k,
            scale,
            ctx.scratch["score_chunks"],
        )

    def _mix(self, x_BTD: torch.Tensor, w_win: torch.Tensor, w_cmp: torch.Tensor, w_sel: torch.Tensor) -> torch.Tensor:
        """The gated sum; `w_sel` may cover only the last queries (the others selected nothing: 0)."""
        B, T, _ = x_BTD.shape
        g_BHT3 = torch.sigmoid(self.gate_proj(x_BTD)).view(B, T, self.n_heads, 3).transpose(1, 2).to(w_win.dtype)
        out = g_BHT3[..., 0:1] * w_win  # two in-place multiply-adds: 3 passes instead of 5 (16k: 5.0 -> 2.7 ms/layer)
        out.addcmul_(g_BHT3[..., 1:2], w_cmp)
        t0 = T - w_sel.shape[2]
        out[:, :, t0:].addcmul_(g_BHT3[:, :, t0:, 2:3], w_sel)
        return out

    # --- decode against the paged cache ------------------------------------------------------------------------
    def reads_pages(self, ctx: AttentionContext, T: int) -> bool:
        """Whether this forward takes `paged`: a few new tokens per row after cached ones, with the pool holding
        the pooled blocks (KVPool.kc). A prefill or a long continuation gathers the whole history instead."""
        return ctx.cache is not None and not ctx.fresh and ctx.cache.pool.kc is not None and T <= PAGED_QUERIES

    def paged(
        self,
        x_BTD: torch.Tensor,
        q_BHTD: torch.Tensor,
        ctx: AttentionContext,
        layer: int,
        scale: float,
        v_dim: int | None = None,
    ) -> torch.Tensor:
        """The three branches reading only what they need from the pool: the window's keys, the pooled blocks (kept
        by `write_blocks` as each block completes) and the selected blocks' keys — O(window + L/compress_block +
        top_k·select_block) rows per query instead of the whole history. Same numbers as `forward` (tested)."""
        pool, read_BL = ctx.cache.pool, ctx.read_slots
        # On CPU these few-row products run in fp32 whatever the model's dtype: oneDNN's bf16 bmm costs ~60 us a
        # call at these sizes against ~8 us in fp32. With compressed_attention's keys no longer copied per head,
        # bf16 decode per token, A/B alternating: 1k 8.65 -> 8.33 ms, 16k 10.5 -> 9.9 ms.
        dtype = q_BHTD.dtype
        q_BHTD = q_BHTD.float() if q_BHTD.device.type == "cpu" else q_BHTD
        B, H, T, _ = q_BHTD.shape
        L, dev = read_BL.shape[1], q_BHTD.device
        mla = pool.v is None
        start_B = ctx.cache.lens  # the cache path's first query position, before this forward advances it

        def rows(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:  # [B, ...] slots -> [B, G, ..., D]
            got = store[slots].to(q_BHTD.dtype)
            return got.unsqueeze(1) if mla else got.movedim(-2, 1)

        plan = ctx.scratch.get("paged")
        if plan is None:  # where the window and the pooled blocks are: the same for every layer of this forward
            plan = ctx.scratch["paged"] = self._paged_plan(ctx, T)
        slots_BS, band_B1TS, pooled_BC = plan
        # window: the W + T - 1 positions up to the last query, one SDPA call under a band mask
        k_win = rows(pool.k[layer], slots_BS)
        v_win = k_win if mla else rows(pool.v[layer], slots_BS)  # MLA: the whole row as value, cut after
        w_win = F.scaled_dot_product_attention(
            q_BHTD, k_win, v_win, attn_mask=band_B1TS, scale=scale, enable_gqa=k_win.shape[1] != H
        )
        w_win = w_win[..., :v_dim] if mla else w_win
        # compressed: the pooled blocks from the stores
        kc_BGCD, vc_BGCV = rows(pool.kc[layer], pooled_BC), rows(pool.vc[layer], pooled_BC)
        if mla:
            vc_BGCV = vc_BGCV[..., :v_dim]
        w_cmp, idx_BGTK, ok_BGTK = self._compressed(q_BHTD, kc_BGCD, vc_BGCV, start_B, ctx, scale)
        # selected: each query's top_k blocks, gathered per query (T is small here)
        G, S = idx_BGTK.shape[1], self.select
        pos = (idx_BGTK[..., None] * S + torch.arange(S, device=dev)).flatten(-2)  # [B, G, T, K·S]
        slots = read_BL.gather(1, pos.flatten(1).clamp(max=L - 1)).view_as(pos)
        if mla:
            k_sel = pool.k[layer][slots].to(q_BHTD.dtype)  # [B, 1, T, K·S, r + rope]
            v_sel = k_sel[..., :v_dim]
        else:
            heads = torch.arange(G, device=dev)[None, :, None, None]
            k_sel = pool.k[layer][slots, heads].to(q_BHTD.dtype)
            v_sel = pool.v[layer][slots, heads].to(q_BHTD.dtype)
        q_BGThD = q_BHTD.unflatten(1, (G, H // G)).transpose(2, 3)
        s = (q_BGThD @ k_sel.transpose(-1, -2)).float() * scale  # [B, G, T, Hg, K·S]
        s = s.masked_fill(~ok_BGTK.repeat_interleave(S, -1)[..., None, :], float("-inf"))
        p = torch.cat((s, s.new_zeros(*s.shape[:-1], 1)), -1).softmax(-1)[..., :-1]  # + the zero sink
        w_sel = (p.to(v_sel.dtype) @ v_sel).transpose(2, 3).flatten(1, 2)
        return self._mix(x_BTD, w_win, w_cmp, w_sel).to(dtype)

    def _paged_plan(self, ctx: AttentionContext, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's slots [B, W + T - 1] and band mask [B, 1, T, W + T - 1], and the store rows [B, blocks] of
        the pooled blocks complete by the longest row's end (block i at its last token's slot // stride); also the
        compressed branch's masks, as one chunk (`score_chunks`' layout) over all of them. Every size follows from
        T and the keys' length L = read_slots.shape[1], none from the lengths' values, so a compiled decode step
        (infer/graphs.py) keeps one graph as the context grows."""
        read_BL, start_B, dev = ctx.read_slots, ctx.cache.lens, ctx.read_slots.device
        W, c, S = self.window, self.compress, self.select
        L = read_BL.shape[1]
        off_B = (start_B - W + 1).clamp(min=0)
        span_S = torch.arange(W + T - 1, device=dev)
        slots_BS = read_BL.gather(1, (off_B[:, None] + span_S).clamp(max=L - 1))
        rel_BTS = (start_B - off_B)[:, None, None] + torch.arange(T, device=dev)[:, None] - span_S
        band_B1TS = ((rel_BTS >= 0) & (rel_BTS < W))[:, None]
        # The blocks complete by the longest row's end (a shorter row's later ones are hidden from its queries
        # below), plus two selection blocks' worth that no query sees: no count is ever 0 or 1, sizes a compiled
        # graph would specialise on (4 graphs over a conversation's first 128 tokens, ~25 s of compiling each).
        nC = L // c + 2 * (S // c)
        last_BC = read_BL.gather(
            1, (torch.arange(nC, device=dev) * c + c - 1).clamp(max=L - 1).expand(len(read_BL), nC)
        )
        pos_BT = start_B[:, None] + torch.arange(T, device=dev)
        hidden_BTC = torch.arange(nC, device=dev) >= ((pos_BT + 1) // c)[..., None]
        n_sel = nC // (S // c)
        blocks = torch.arange(n_sel, device=dev)
        cand_BTS = (blocks * S <= pos_BT[..., None] - W) & ((blocks + 1) * S <= pos_BT[..., None] + 1)
        ctx.scratch["score_chunks"] = [(0, T, 0, nC, hidden_BTC, n_sel, ~cand_BTS[:, None])]
        return slots_BS, band_B1TS, last_BC // ctx.cache.pool.compress_stride

    def write_blocks(self, ctx: AttentionContext, layer: int) -> None:
        """Pool each block this forward completes (its keys already in the pool) into KVPool.kc/vc, where `paged`
        reads it. Also in a prefill, and for a token leaving the layer early: whatever later tokens will read."""
        pool = ctx.cache.pool
        plan = ctx.scratch.get("new_blocks")
        if plan is None:
            plan = ctx.scratch["new_blocks"] = _new_blocks(ctx, self.compress, pool.compress_stride)
        slots_NC, index_N, any_new = plan
        if not any_new:
            return
        w_k, w_v = self.pool_logits.detach().float().softmax(-1)
        keys = pool.k[layer][slots_NC].float()  # [N, c, ...]
        values = keys if pool.v is None else pool.v[layer][slots_NC].float()
        pool.kc[layer][index_N] = torch.einsum("nc...,c->n...", keys, w_k).to(pool.kc[layer].dtype)
        pool.vc[layer][index_N] = torch.einsum("nc...,c->n...", values, w_v).to(pool.vc[layer].dtype)


PAGED_QUERIES = 64  # new tokens per row up to which `paged` runs (decode, speculative verify, short continuations)


def _new_blocks(ctx: AttentionContext, c: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The slots [N, c] of the blocks this forward may complete and where each one's pooled entry goes: its last
    token's slot // stride, or the stores' last row (scratch) for a candidate that does not complete. N is fixed
    by the shapes — (T - 1) // c + 1 candidates per row, row b's first being lens_b // c — so a compiled step does
    not specialise on how many blocks complete (0 or 1 per row in decode). Computed once per forward; the flag
    (eager only) lets the layers skip the 31 steps in 32 that complete nothing."""
    cache = ctx.cache
    lens, end = cache.lens, cache.lens + ctx.input_lens
    T, dev = ctx.cos.shape[-2], lens.device  # cos: [B or 1, 1, T, rope/2]
    j_N = torch.arange((T - 1) // c + 1, device=dev)
    block_BN = (lens // c)[:, None] + j_N
    done_BN = (block_BN + 1) * c <= end[:, None]
    pos_BNC = (block_BN[..., None] * c + torch.arange(c, device=dev)).clamp(max=(end[:, None, None] - 1).clamp(min=0))
    bs = cache.pool.block_size
    page_BNC = cache.block_table.gather(1, (pos_BNC // bs).flatten(1)).view_as(pos_BNC)
    slots_BNC = (page_BNC * bs + pos_BNC % bs).clamp(min=0)
    scratch = cache.pool.kc[0].shape[0] - 1
    index_BN = torch.where(done_BN, slots_BNC[..., -1] // stride, scratch)
    any_new = True if torch.compiler.is_compiling() else bool(done_BN.any())
    return slots_BNC.flatten(0, 1), index_BN.flatten(), any_new


def make_sparse(config: ModelConfig) -> HybridSparseAttention | None:
    return HybridSparseAttention(config, config.num_attention_heads) if config.sparse_attention == "hybrid" else None


def query_starts(ctx: AttentionContext, B: int, T: int, L: int) -> torch.Tensor:
    """[B] position of each row's first query. Fresh: 0. Against a cache or a contiguous past, the mask's first row
    sees keys 0..start (a right-padded row's padding queries come after its real ones and see no more than it)."""
    if ctx.fresh:
        return torch.zeros(B, dtype=torch.long, device=ctx.cos.device)
    mask = ctx.mask[:, 0]  # [B, T, L]
    start_B = mask[:, 0].sum(-1) - 1
    if ctx.past is not None:  # the export path may carry a left-padded attention_mask: keys no longer = positions
        prefix = (
            torch.arange(L, device=mask.device) <= (start_B[:, None] + torch.arange(T, device=mask.device))[..., None]
        )
        if not torch.equal(mask, prefix):
            raise ValueError(
                "sparse_attention='hybrid' addresses keys by position, so it needs right-padded batches; this "
                "forward has a left-padded attention_mask (past=...). Right-pad the batch or use the paged cache."
            )
    return start_B.long()


def _values(k_BGLD: torch.Tensor, v_BGLV: torch.Tensor | None, v_dim: int | None) -> torch.Tensor:
    return v_BGLV if v_BGLV is not None else k_BGLD[..., :v_dim]


def window_attention(
    q_BHTD: torch.Tensor,
    k_BGLD: torch.Tensor,
    v_BGLV: torch.Tensor | None,
    start_B: torch.Tensor,
    window: int,
    scale: float,
    v_dim: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Each query attends to the keys at positions (pos - window, pos]: queries in chunks of WINDOW_CHUNK, each
    chunk one SDPA call over its chunk + window keys (gathered by position, so rows may start anywhere).
    `causal`: the caller knows every row starts at 0 with no more than `window` tokens, so the window is all of
    each query's past: one causal SDPA call, no gathered spans (a third of whose products the band masks out)."""
    B, H, T, D = q_BHTD.shape
    G, L = k_BGLD.shape[1], k_BGLD.shape[2]
    if causal:
        v = k_BGLD if v_BGLV is None else v_BGLV  # MLA: the keys as values, cut after (one head dim for SDPA)
        out = F.scaled_dot_product_attention(q_BHTD, k_BGLD, v, is_causal=True, scale=scale, enable_gqa=G != H)
        return out[..., :v_dim] if v_BGLV is None else out
    C = min(WINDOW_CHUNK, T)
    n = -(-T // C)
    span = C + window - 1
    dev = q_BHTD.device
    # Key s of chunk i is at position start + i·C - window + 1 + s, so query c's distance to it, c - s + window - 1,
    # is the same in every chunk: one [C, span] band, and-ed with "the key exists" per chunk. (Building the full
    # [chunks, C, span] distances per layer took 22 ms of the 16k window branch's 61.)
    k_pos_BNS = start_B[:, None, None] + (torch.arange(n, device=dev) * C - window + 1)[:, None]
    k_pos_BNS = k_pos_BNS + torch.arange(span, device=dev)
    rel_CS = torch.arange(C, device=dev)[:, None] - torch.arange(span, device=dev) + (window - 1)
    mask_N1CS = ((rel_CS >= 0) & (rel_CS < window) & (k_pos_BNS >= 0)[:, :, None]).flatten(0, 1)[:, None]
    rows = (k_pos_BNS.clamp(0, L - 1) + (torch.arange(B, device=dev) * L)[:, None, None]).flatten()

    def take(e_BGLX: torch.Tensor) -> torch.Tensor:  # each chunk's span of rows -> [B·n, G, span, X]
        flat = e_BGLX.transpose(1, 2).reshape(B * L, -1)  # a view for the layouts attention.py passes
        return flat.index_select(0, rows).view(B, n, span, G, -1).permute(0, 1, 3, 2, 4).flatten(0, 1)

    # SDPA's fused kernels want one head dim for q, k and v: the MLA latent's values are its keys' first columns, so
    # pass the keys as values and cut the output (as attention.py's absorbed path does).
    k_NGSD = take(k_BGLD)
    v_NGSV = k_NGSD if v_BGLV is None else take(v_BGLV)
    q_BHTD = q_BHTD if n * C == T else F.pad(q_BHTD, (0, 0, 0, n * C - T))
    q_NHCD = q_BHTD.reshape(B, H, n, C, D).transpose(1, 2).flatten(0, 1)
    out = F.scaled_dot_product_attention(q_NHCD, k_NGSD, v_NGSV, attn_mask=mask_N1CS, scale=scale, enable_gqa=G != H)
    out = out.view(B, n, H, C, -1).transpose(1, 2).reshape(B, H, n * C, -1)[:, :, :T]
    return out[..., :v_dim] if v_BGLV is None else out


def pool_blocks(
    k_BGLD: torch.Tensor, values_BGLV: torch.Tensor, pool_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled key and value of every complete `compress_block`-token block: [B, G, L // c, D] and [.., V]."""
    c = pool_logits.shape[1]
    nC = k_BGLD.shape[2] // c
    w_k, w_v = pool_logits.float().softmax(-1).to(k_BGLD.dtype)
    kc_BGCD = torch.einsum("bgncd,c->bgnd", k_BGLD[:, :, : nC * c].unflatten(2, (nC, c)), w_k)
    vc_BGCV = torch.einsum("bgncd,c->bgnd", values_BGLV[:, :, : nC * c].unflatten(2, (nC, c)), w_v)
    return kc_BGCD, vc_BGCV


def compressed_attention(
    q_BHTD: torch.Tensor,
    kc_BGCD: torch.Tensor,
    vc_BGCV: torch.Tensor,
    start_B: torch.Tensor,
    c: int,
    window: int,
    select: int,
    top_k: int,
    scale: float,
    chunks: list[tuple] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over the pooled blocks (`pool_blocks`, or the paged cache's stores), and each query's selection.

    Returns the branch output [B, H, T, V], the selected block ids [B, G, T, top_k] and whether each is real
    (a query early in the text has fewer candidate blocks than top_k). Block i is visible to a query at position p
    once complete, (i + 1)·compress <= p + 1. A zero key with a zero value (a sink: logit 0) is always visible, so a
    query with no complete block yet gets 0 rather than NaN, and a head can put its weight nowhere."""
    B, H, T, D = q_BHTD.shape
    G, nC = kc_BGCD.shape[1], kc_BGCD.shape[2]
    per = select // c
    kc_BGCD, vc_BGCV = kc_BGCD.to(q_BHTD.dtype), vc_BGCV.to(q_BHTD.dtype)
    # the sink as block 0: its logit and value come out of the same products, no [T, blocks] concatenation
    kc_BGCD, vc_BGCV = F.pad(kc_BGCD, (0, 0, 1, 0)), F.pad(vc_BGCV, (0, 0, 1, 0))
    Hg = H // G
    q_BGHTD = q_BHTD.unflatten(1, (G, Hg))
    if chunks is None:
        chunks = score_chunks(start_B, T, nC, c, window, select)
    outs, idxs, oks = [], [], []
    for t0, t1, lo, n_vis, hidden_BTC, n_sel, shut_B1TS in chunks:
        # the heads sharing a key folded into the rows: one [Hg·t, D] x [D, blocks] product per key head, where
        # broadcasting the keys over the heads copied them once per head
        q_chunk = (q_BGHTD[:, :, :, t0:t1] * scale).flatten(2, 3)
        scores = (q_chunk @ kc_BGCD[:, :, : n_vis + 1].transpose(-1, -2)).float().unflatten(2, (Hg, t1 - t0))
        if hidden_BTC is not None:
            scores[..., lo + 1 :].masked_fill_(hidden_BTC[:, None, None], float("-inf"))
        p = scores.softmax(-1)
        outs.append((p.to(vc_BGCV.dtype).flatten(2, 3) @ vc_BGCV[:, :, : n_vis + 1]).unflatten(2, (Hg, t1 - t0)))
        # Selection (no gradient, as in NSA): a block's score is its compressed blocks' weight summed over the heads
        # sharing its keys.
        # (a strided slice per position in the block, not unflatten: inductor cannot lower that view of a dynamic
        # size, so compiled decode would fail)
        heads_BGTC = p.detach().sum(2)
        sel_BGTS = sum(heads_BGTC[..., 1 + j : n_sel * per + 1 : per] for j in range(per))
        # top_k columns of -inf appended: k is fixed whatever the number of candidates (no size to specialise on);
        # a slot without a real candidate points at block 0 and is masked
        sel_BGTS = F.pad(sel_BGTS.masked_fill(shut_B1TS, float("-inf")), (0, top_k), value=float("-inf"))
        top, idx = sel_BGTS.topk(top_k, dim=-1)
        ok = top > float("-inf")
        idxs.append(idx.masked_fill(~ok, 0))
        oks.append(ok)
    return torch.cat(outs, 3).flatten(1, 2), torch.cat(idxs, 2), torch.cat(oks, 2)


def score_chunks(start_B: torch.Tensor, T: int, nC: int, c: int, window: int, select: int) -> list[tuple]:
    """What `compressed_attention`'s query chunks mask, the same in every layer of a forward (its callers compute it
    once): per chunk (t0, t1, lo, n_vis, hidden [B, t, n_vis - lo] or None, n_sel, not-a-candidate [B, 1, t, n_sel]).
    Blocks before `lo` are complete for every query of the chunk; only [lo, n_vis) needs the causal mask. Selection
    candidates are complete and start at or before the window's first key minus one."""
    dev, per = start_B.device, select // c
    chunks = []
    for t0 in range(0, T, SCORE_CHUNK):
        t1 = min(T, t0 + SCORE_CHUNK)
        pos_BT = start_B[:, None] + torch.arange(t0, t1, device=dev)
        lo, n_vis = (int(pos_BT.min()) + 1) // c, min(nC, (int(pos_BT.max()) + 1) // c)
        hidden_BTC = torch.arange(lo, n_vis, device=dev) >= ((pos_BT + 1) // c)[..., None] if n_vis > lo else None
        n_sel = n_vis // per
        blocks = torch.arange(n_sel, device=dev)
        cand_BTS = (blocks * select <= pos_BT[..., None] - window) & ((blocks + 1) * select <= pos_BT[..., None] + 1)
        chunks.append((t0, t1, lo, n_vis, hidden_BTC, n_sel, ~cand_BTS[:, None]))
    return chunks


def _fused_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> bool:
    """Whether `selected_attention` runs its tiles through torch's fused CPU attention kernel: on CPU, when no
    gradient is needed (the kernel's log-sum-exp output has none, and the combine needs it)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    return q.device.type == "cpu" and not grad


def selected_attention(
    q_BHTD: torch.Tensor,
    k_BGLD: torch.Tensor,
    v_BGLV: torch.Tensor | None,
    idx_BGTK: torch.Tensor,
    ok_BGTK: torch.Tensor,
    select: int,
    scale: float,
    v_dim: int | None = None,
) -> torch.Tensor:
    """Each query attends to the keys of its selected blocks (one softmax over all of them, plus a zero sink).

    Gathering each query's blocks would copy top_k·select keys per query (1.3 GB per layer at 16k tokens, top 4 of
    64: 0.7-1.0 s, slower than dense attention). Instead the (query, block) pairs are sorted by block and packed into
    tiles of P pairs of one block: a tile is one [P·heads, D] x [D, select] product, each block's keys are read once
    per tile, and the queries (heads·D numbers each) are what gets copied. The query's softmax normaliser comes from
    its pairs' log-sum-exps, so each tile row's output is already weighted by its keys' share of the whole softmax and
    the rows are simply summed into their query (index_add). That spares normalising and then re-weighting every
    pair's output (two full passes and a [pairs, heads, V] gather): the branch alone 0.29 -> 0.19 s at 16k tokens
    (4 heads, latent 80), the whole 16k hybrid prefill 2.72 -> 2.58 s. Padding rows and slots without a candidate
    point at an extra zero query whose normaliser is +inf, so they add exactly 0."""
    B, H, T, D = q_BHTD.shape
    G, L = k_BGLD.shape[1], k_BGLD.shape[2]
    Hg, K, S = H // G, idx_BGTK.shape[-1], select
    nS = L // S
    V = v_dim if v_BGLV is None else v_BGLV.shape[-1]
    dev, dtype = q_BHTD.device, q_BHTD.dtype
    if nS == 0 or K == 0 or T == 0:  # no block yet, or no query that could select one
        return q_BHTD.new_zeros(B, H, T, V)
    n_q, n_blocks, n_pairs = B * G * T, B * G * nS, B * G * T * K
    block = (torch.arange(B * G, device=dev)[:, None, None] * nS + idx_BGTK.flatten(0, 1)).flatten()
    # Tile height: about the pairs each block gets (a decode step: 1 row per tile, no padding work).
    P = 1 << max(0, min(6, int(math.log2(max(1, n_pairs // n_blocks)))))
    block_sorted, order = block.sort()
    counts = torch.bincount(block_sorted, minlength=n_blocks)
    tiles_per_block = (counts + P - 1) // P
    n_tiles = int(tiles_per_block.sum())
    first_pair = counts.cumsum(0) - counts
    first_row = (tiles_per_block.cumsum(0) - tiles_per_block) * P
    row_sorted = first_row[block_sorted] + torch.arange(n_pairs, device=dev) - first_pair[block_sorted]
    tile_block = torch.repeat_interleave(torch.arange(n_blocks, device=dev), tiles_per_block, output_size=n_tiles)
    pair_query = (torch.arange(n_pairs, device=dev) // K).masked_fill(~ok_BGTK.flatten(), n_q)
    row_query = torch.full((n_tiles * P,), n_q, dtype=torch.long, device=dev)
    row_query = row_query.index_put((row_sorted,), pair_query[order])  # each tile row's query (n_q: none)
    q_rows = (q_BHTD * scale).unflatten(1, (G, Hg)).permute(0, 1, 3, 2, 4).reshape(n_q, Hg * D)
    q_rows = F.pad(q_rows, (0, 0, 0, 1))  # query n_q: zeros
    k_tiles = k_BGLD[:, :, : nS * S].reshape(n_blocks, S, D).index_select(0, tile_block)
    if v_BGLV is None:  # MLA: the values are the latent's first V columns, already in the key tiles
        v_tiles = k_tiles[..., :V]
    else:
        v_tiles = v_BGLV[:, :, : nS * S].reshape(n_blocks, S, V).index_select(0, tile_block)
    q_tiles = q_rows.index_select(0, row_query).view(n_tiles, P * Hg, D)
    fused = _fused_tiles(q_tiles, k_BGLD, v_BGLV)
    if fused:
        # One fused kernel for product, softmax and values, returning each row's log-sum-exp (what the combine
        # below needs): 16k tokens, the branch 0.50 -> 0.41 s in fp32 and 0.43 -> 0.31 s in bf16 (AMX), 6 layers.
        # Its q, k and v share one head dim: the MLA key tiles go in as values and the output is cut after.
        if v_BGLV is None:
            v_tiles = k_tiles
        elif V != D:
            v_tiles = F.pad(v_tiles, (0, D - V))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_tiles[:, None], k_tiles[:, None], v_tiles[:, None], scale=1.0
        )
        o_rows, lse_rows = o.view(n_tiles * P, Hg, -1), lse.view(n_tiles * P, Hg)  # MLA: cut to V at the end
        log_scale = lse_rows  # o_rows is normalised within its tile
    else:
        s = (q_tiles @ k_tiles.transpose(1, 2)).float()
        # e = exp(s - m) in place: m only keeps exp in range (the result does not depend on it), so it is detached
        # and nothing else holds s. exp(s_j - total) = e_j·exp(m - total) scales each row once, after the product.
        m = s.detach().amax(-1, keepdim=True)
        e = s.sub_(m).exp_()
        lse_rows = (m + e.sum(-1, keepdim=True).log()).view(n_tiles * P, Hg)
        o_rows, log_scale = (e.to(dtype) @ v_tiles).view(n_tiles * P, Hg, V), m.view(n_tiles * P, Hg)
    row = torch.empty_like(row_sorted).index_put((order,), row_sorted)  # each pair's row, in pair order
    lse = lse_rows.index_select(0, row).view(n_q, K, Hg).masked_fill(~ok_BGTK.reshape(n_q, K, 1), float("-inf"))
    # the query's log-normaliser over all its selected keys and the sink (logit 0); +inf for query n_q
    total = F.pad(torch.logsumexp(torch.cat((lse, lse.new_zeros(n_q, 1, Hg)), 1), 1), (0, 0, 0, 1), value=math.inf)
    w = torch.exp(log_scale - total.index_select(0, row_query))[..., None]  # [rows, Hg, 1]: 0 for query n_q
    # weighted in place where nothing needs the unweighted rows for a gradient (at deepseek-v3-small's width, 8
    # heads, the out-of-place product was 19% of the branch)
    o_rows = o_rows.float().mul_(w) if fused else o_rows.float() * w
    W = o_rows.shape[-1]
    out = o_rows.new_zeros(n_q + 1, Hg * W).index_add_(0, row_query, o_rows.view(-1, Hg * W))  # summed in fp32
    return out[:n_q].view(B, G, T, Hg, W)[..., :V].permute(0, 1, 3, 2, 4).reshape(B, H, T, V).to(dtype)
