"""Attention: grouped-query attention (Llama, Qwen2) and DeepSeek's Multi-head Latent Attention.

Both run in one of two modes, chosen once per forward by `AttentionContext`:
- causal over the new tokens only (training, and a prefill whose rows have nothing cached yet): one SDPA call;
- against the paged cache (decode, continued prefill, speculative verification): new entries are written to the
  pool, then each row's cached entries are gathered and attended to under an explicit mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.cache import KVCache
from deepsail.model.config import ModelConfig
from deepsail.model.layers import Linear, RMSNorm, apply_rope
from deepsail.model.sparse_attention import make_sparse


class AttentionGate(nn.Module):
    """Gated attention (Qiu et al. 2025, arXiv 2505.06708, their best position "G1"): the attention output of each
    head is multiplied by sigmoid(x W_g) of the same token's layer input before `o_proj`. Query-dependent and
    elementwise, it adds non-linearity between the value and output projections and lets a head output ~0 instead
    of dumping its probability mass on the first token (the attention sink). `headwise` is one gate per head."""

    def __init__(self, config: ModelConfig, head_dim: int) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        per_head = head_dim if config.attn_gate == "elementwise" else 1
        self.proj = Linear(config.hidden_size, self.n_heads * per_head, bias=False)

    def forward(self, x_BTD: torch.Tensor, out_BHTV: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        g = torch.sigmoid(self.proj(x_BTD)).view(B, T, self.n_heads, -1).transpose(1, 2)  # [B, H, T, 1 or V]
        return out_BHTV * g.to(out_BHTV.dtype)


def make_gate(config: ModelConfig, head_dim: int) -> AttentionGate | None:
    return AttentionGate(config, head_dim) if config.attn_gate != "none" else None


# Up to this many (query, key) pairs per head, a bf16 backward through an explicit mask runs as matmuls + softmax:
# on CPU, SDPA's flash backward there took 2.6x as long (GRPO's reply pass: 64 rows x 47 queries x 115 keys, MLA's
# absorbed form, 37.9 vs 14.6 ms per layer; at 128 x 256 pairs the two are equal, past it flash wins).
MATH_BACKWARD_PAIRS = 16_384


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA over explicit keys and mask ([B, 1, T, L]; keys may have fewer heads than the queries)."""
    T, L = q.shape[-2], k.shape[-2]
    if (
        q.requires_grad
        and torch.is_grad_enabled()
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and T * L <= MATH_BACKWARD_PAIRS
        and not torch.compiler.is_compiling()
    ):
        G = k.shape[1]
        q_BGhTD = q.unflatten(1, (G, q.shape[1] // G))
        s = (q_BGhTD @ k[:, :, None].transpose(-1, -2)).float() * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None], float("-inf"))
        return (s.softmax(-1).to(v.dtype) @ v[:, :, None]).flatten(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


@dataclass
class AttentionContext:
    """Everything about positions and the cache that is the same for every layer of one forward pass."""

    cos: torch.Tensor  # [B or 1, 1, T, rope_dim/2]
    sin: torch.Tensor
    cache: KVCache | None = None
    write_slots: torch.Tensor | None = None  # [N] pool slots of the valid new tokens
    write_rows: torch.Tensor | None = None  # [N] their flat indices in the [B*T] batch
    read_slots: torch.Tensor | None = None  # [B, L] pool slot of every key position (0 where masked)
    mask: torch.Tensor | None = None  # [B, 1, T, L] True where a query may attend a key
    input_lens: torch.Tensor | None = None  # [B] new tokens of each row, with a cache (the rest is right padding)
    fresh: bool = True  # no row has cached tokens: plain causal attention over the new tokens
    # False: bidirectional attention over the new tokens (an encoder, e.g. multimodal/align.py's text encoder), with
    # `mask` [B, 1, 1 or T, T] saying which keys are real; only without a cache.
    causal: bool = True
    # Instead of the paged cache, a contiguous past per layer ([B, P, ...] tensors, as an exported graph takes
    # them): the layer's entries for the new tokens are appended and the result is its `present`.
    past: list[tuple[torch.Tensor, ...]] | None = None
    present: list[tuple[torch.Tensor, ...]] | None = None
    scratch: dict[str, Any] = field(default_factory=dict)  # what every layer's first user computes once per forward

    def encoder_mask(self) -> torch.Tensor | None:
        """The padding mask of a bidirectional pass (None for a causal one, whose mask SDPA builds itself)."""
        assert self.causal or (self.cache is None and self.past is None), "an encoder pass takes no cache"
        return None if self.causal else self.mask

    def write(self, store: torch.Tensor, entries_BT: torch.Tensor) -> None:
        flat = entries_BT.reshape(-1, *entries_BT.shape[2:])
        store.index_copy_(0, self.write_slots, flat.index_select(0, self.write_rows).to(store.dtype))

    def history(self, layer: int, *new_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every entry the new queries may attend to, [B, L, ...] per store: gathered from the paged pool (the new
        entries were written there first), or the contiguous past followed by the new entries."""
        if self.past is None:
            pool = self.cache.pool
            return tuple(store[layer][self.read_slots] for store in (pool.k, pool.v)[: len(new_BT)])
        full = tuple(torch.cat((p, n.to(p.dtype)), dim=1) for p, n in zip(self.past[layer], new_BT))
        self.present[layer] = full
        return full


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.interleave, self.scale = config.rope_interleave, config.softmax_scale
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type == "llama"  # Qwen2: q/k/v bias, no o bias
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=o_bias)
        self.gate = make_gate(config, self.head_dim)
        self.sparse = make_sparse(config)

    def write_kv(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys (rotated) and values [B, kv_heads, T, d] of the tokens, written to the cache if any: a
        token that skips the rest of the layer (early exit, model/depth.py) still leaves what later tokens read."""
        B, T, _ = x_BTD.shape
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        k = apply_rope(k, ctx.cos, ctx.sin, self.interleave)
        if ctx.cache is not None:
            pool = ctx.cache.pool
            ctx.write(pool.k[self.layer_idx], k.transpose(1, 2))
            ctx.write(pool.v[self.layer_idx], v.transpose(1, 2))
            if self.sparse is not None and pool.kc is not None:
                self.sparse.write_blocks(ctx, self.layer_idx)
        return k, v

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, ctx.cos, ctx.sin, self.interleave)
        k, v = self.write_kv(x_BTD, ctx)
        gqa = self.n_kv != self.n_heads
        if self.sparse is not None and self.sparse.reads_pages(ctx, T):  # a decode step: what it needs from the pool
            out = self.sparse.paged(x_BTD, q, ctx, self.layer_idx, self.scale)
        elif self.sparse is not None:  # hybrid sparse attention over every key so far (sparse_attention.py)
            if not ctx.fresh:
                k, v = (
                    e.transpose(1, 2).to(q.dtype)
                    for e in ctx.history(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
                )
            out = self.sparse(x_BTD, q, k, v, ctx, self.scale)
        elif ctx.fresh:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.encoder_mask(), is_causal=ctx.causal, scale=self.scale, enable_gqa=gqa
            )
        else:
            k, v = (
                e.transpose(1, 2).to(q.dtype) for e in ctx.history(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
            )
            out = masked_attention(q, k, v, ctx.mask, self.scale)
        if self.gate is not None:
            out = self.gate(x_BTD, out)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 §2.1). Keys and values are up-projected from a small latent c_kv shared by all heads, plus one
    rope key shared by all heads. Training expands the latent into per-head K/V; decoding folds the up-projections
    into the query and the output ("absorption"), so it attends directly over the cached latents and the cache never
    holds per-head keys or values."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.interleave, self.scale = config.rope_interleave, config.softmax_scale
        d, qk_dim, bias = config.hidden_size, config.qk_head_dim, config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = Linear(d, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, d, bias=bias)
        self.gate = make_gate(config, self.v_dim)
        self.sparse = make_sparse(config)

    def write_kv(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """What the cache keeps per token, [B, T, r + rope]: the normed latent and the rotated shared rope key,
        written to the cache if any (also for a token that skips the rest of the layer: model/depth.py)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, None], ctx.cos, ctx.sin, self.interleave)[:, 0]
        entries = torch.cat((self.kv_a_layernorm(c_kv), k_rope), dim=-1)
        if ctx.cache is not None:
            ctx.write(ctx.cache.pool.k[self.layer_idx], entries)
            if self.sparse is not None and ctx.cache.pool.kc is not None:
                self.sparse.write_blocks(ctx, self.layer_idx)
        return entries

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, r = self.n_heads, self.kv_lora_rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if self.q_lora_rank else self.q_proj(x_BTD)
        q_nope, q_rope = q.view(B, T, H, -1).transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin, self.interleave)
        entries = self.write_kv(x_BTD, ctx)
        c_kv, k_rope = entries[..., :r], entries[..., r:][:, None]  # [B, T, r], [B, 1, T, rope]

        if ctx.fresh and self.sparse is None:  # expanded path: per-head keys/values from the latent of the new tokens
            k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, -1).transpose(1, 2).split([self.nope_dim, self.v_dim], -1)
            q = torch.cat((q_nope, q_rope), dim=-1)
            k = torch.cat((k_nope, k_rope.expand(B, H, T, self.rope_dim)), dim=-1)
            # SDPA's fused kernels want one head dim for q, k and v; zero-padding v costs little, the math
            # fallback it avoids costs ~9x (measured on CPU at d_qk 48, d_v 32).
            pad = q.shape[-1] - self.v_dim
            out = F.scaled_dot_product_attention(
                q,
                k,
                F.pad(v, (0, pad)) if pad > 0 else v,
                attn_mask=ctx.encoder_mask(),
                is_causal=ctx.causal,
                scale=self.scale,
            )[..., : self.v_dim]
        else:  # absorbed path: q_nope·(W_UK c) = (q_nope W_UK)·c, and the output is W_UV (attn·c)
            # (hybrid sparse attention always takes this path: one latent key head shared by all query heads)
            w = self.kv_b_proj.effective_weight()  # [H·(nope+v), r], or [B, H·(nope+v), r] with per-row adapters
            w_kv_b = w.view(*w.shape[:-2], H, self.nope_dim + self.v_dim, r).to(q.dtype)
            # matmul broadcasting over heads rather than einsum: same bmm, without einsum's per-call planning
            q_latent = q_nope @ w_kv_b[..., : self.nope_dim, :]  # [B, H, T, r]
            query = torch.cat((q_latent, q_rope), dim=-1)
            if self.sparse is not None and self.sparse.reads_pages(ctx, T):  # a decode step: only the rows it reads
                out_latent = self.sparse.paged(x_BTD, query, ctx, self.layer_idx, self.scale, v_dim=r)
            else:
                (latent,) = (entries,) if ctx.fresh else ctx.history(self.layer_idx, entries)  # [B, L, r + rope]
                key = latent.to(q.dtype)[:, None]
                # Values are the latents c_kv: pass the whole cache row as value (same head dim as the key, so the
                # fused kernel runs) and drop the rope columns of the output.
                if self.sparse is not None:
                    out_latent = self.sparse(x_BTD, query, key, None, ctx, self.scale, v_dim=r)
                else:
                    out_latent = masked_attention(query, key, key, ctx.mask, self.scale)[..., :r]
            out = out_latent @ w_kv_b[..., self.nope_dim :, :].transpose(-1, -2)  # [B, H, T, v]
        if self.gate is not None:
            out = self.gate(x_BTD, out)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))
