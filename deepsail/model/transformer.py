"""The decoder: embeddings -> N blocks (attention + dense MLP or DeepSeekMoE) -> norm -> head, plus MTP modules.

Written for one device. Activation checkpointing, compilation and parallelism are applied from outside, in one
place (`deepsail.parallel.parallelize`); HF checkpoint loading and saving come from the `HFCheckpoint` mixin
(`hf.py`, the one place that knows HF's names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.attention import AttentionContext, GroupedQueryAttention, MultiHeadLatentAttention
from deepsail.model.cache import KVCache, new_cache
from deepsail.model.config import ModelConfig, config_from_seed
from deepsail.model.depth import DepthRouter, exit_layers, exit_loss, routes
from deepsail.model.hf import HFCheckpoint
from deepsail.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding
from deepsail.model.loss import IGNORE_INDEX, linear_cross_entropy
from deepsail.model.moe import MoE


@dataclass
class ModelOutput:
    # [B, T, V] (or [B, 1, V] with last_logits_only); None for a training forward with labels, whose loss comes
    # straight from the hidden states (model/loss.py) without the [B, T, V] logits
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight·mtp_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths
    aux_loss: torch.Tensor | None = None  # sum over MoE layers (already weighted by aux_loss_alpha)
    hidden: torch.Tensor | None = None  # [B, T, D] last block's output before the final norm (what MTP consumes)
    present: list[tuple[torch.Tensor, ...]] | None = None  # with `past`: each layer's past + the new entries


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool) -> None:
        super().__init__()
        attention = MultiHeadLatentAttention if config.attention_type == "mla" else GroupedQueryAttention
        self.self_attn = attention(config, layer_idx)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = DepthRouter(config) if routes(config, layer_idx) else None  # Mixture-of-Depths (depth.py)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.router is not None:
            return self.router(self, x, ctx)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """DeepSeek-V3 §2.2: h'_i = W[RMSNorm(h_i); RMSNorm(Emb(t_{i+k}))], one block, then the shared head.

    The embedding and output head are the main model's (shared, not copied)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.block = Block(config, layer_idx, moe=config.is_moe)
        self.norm = RMSNorm(d, config.rms_norm_eps)  # "shared_head.norm" in DeepSeek's checkpoint

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.block(x, ctx)


class Transformer(HFCheckpoint, nn.Module):
    """A DeepSeek-style decoder. `Transformer(config)` or, from a few numbers, `Transformer(layers=12, heads=16)`."""

    def __init__(self, config: ModelConfig | None = None, **seed: Any) -> None:
        super().__init__()
        if config is None:
            config = config_from_seed(**seed)
        elif seed:
            raise ValueError("pass either a ModelConfig or seed numbers (layers=, heads=, ...), not both")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, moe=config.is_moe_layer(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the head with the embedding when the config says so (again after to_empty or an assign-load)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # --- initialisation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases and the balancing bias."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std))
        for module in self.modules():
            if isinstance(module, MoE):
                module.gate.e_score_correction_bias.zero_()

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        input_lens: torch.Tensor | None = None,
        last_logits_only: bool = False,
        return_hidden: bool = False,
        past: list[tuple[torch.Tensor, ...]] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T]. With `labels` ([B, T], -100 = ignore) the output carries the training losses.

        With a `cache`, row b's first `input_lens[b]` tokens (default all T; the rest is right padding) are appended
        after its `cache.lens[b]` cached tokens and the cache advances. `last_logits_only` returns each row's logits
        at its last real token only — all a sampler needs.

        Instead of a cache, `past` holds each layer's earlier entries as contiguous tensors — `(latent [B, P, r +
        rope],)` for MLA, `(keys, values)` each [B, P, kv_heads, head_dim] otherwise; `new_past(B)` makes empty
        ones — and the output's `present` the same with the new tokens appended: the stateless form an exported
        graph (ONNX, torch.export) takes. `attention_mask` [B, P + T] (1 = real token, 0 = padding, e.g. a left-padded
        batch) then says which entries count; positions are counted over the real tokens.

        `inputs_embeds` [B, T, D] replaces the token embeddings (input_ids still give the shape and the MTP
        targets): an image-conditioned decoder (multimodal/connector.py) puts projected image features there.
        """
        B, T = input_ids.shape
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.shape != (B, T, self.config.hidden_size):
                raise ValueError(
                    f"inputs_embeds {list(inputs_embeds.shape)} must be [B, T, hidden] = "
                    f"{[B, T, self.config.hidden_size]}"
                )
            x = inputs_embeds.to(self.embed_tokens.weight.dtype)
        if past is not None:
            ctx = self._past_context(B, T, past, attention_mask)
        else:
            ctx = self.attention_context(B, T, input_ids.device, cache, input_lens)
        exits = set(exit_layers(self.config)) if labels is not None and self.config.exit_loss_weight else set()
        exit_states = []
        for i, block in enumerate(self.layers):
            x = block(x, ctx)
            if i in exits:
                exit_states.append(x)
        hidden = x
        if last_logits_only:
            last = (input_lens - 1) if input_lens is not None else torch.full((B,), T - 1, device=x.device)
            x = x[torch.arange(B, device=x.device), last][:, None]
        fused = labels is not None and not last_logits_only and self._fused_loss()
        logits = None if fused else self.logits_of(x)
        out = ModelOutput(logits=logits, hidden=hidden if return_hidden else None, present=ctx.present)
        if cache is not None:
            cache.lens += input_lens if input_lens is not None else T
        if labels is not None:
            out.lm_loss = self._loss(self.norm(x) if fused else None, logits, labels)
            out.loss = out.lm_loss
            if len(self.mtp):
                out.mtp_loss = self._mtp_loss(hidden, input_ids, labels)
                out.loss = out.loss + self.config.mtp_loss_weight * out.mtp_loss
            if exit_states:  # LayerSkip: the shared head also reads the upper layers (depth.py)
                out.loss = out.loss + self.config.exit_loss_weight * exit_loss(self, exit_states, labels)
            aux = [m.aux_loss for m in self.modules() if isinstance(m, (MoE, DepthRouter)) and m.aux_loss is not None]
            if aux and self.training:
                out.aux_loss = torch.stack(aux).sum()
                out.loss = out.loss + out.aux_loss
        return out

    def _fused_loss(self) -> bool:
        """Whether training losses skip the logits (model/loss.py): when gradients flow and the head is the
        model's own plain Linear (a LoRA, QAT or quantized head is its own code, and goes the plain route)."""
        return torch.is_grad_enabled() and type(self.lm_head) is Linear and self.lm_head.bias is None

    def _loss(self, normed: torch.Tensor | None, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if logits is None:
            return linear_cross_entropy(normed, self.lm_head.weight, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last block's output (`ModelOutput.hidden`): final norm, then the head."""
        return self.lm_head(self.norm(hidden))

    def attention_context(
        self, B: int, T: int, device: torch.device, cache: KVCache | None, input_lens: torch.Tensor | None
    ) -> AttentionContext:
        """Positions, cache slots and masks for a forward of B rows of T new tokens (the same for every layer)."""
        if cache is None:
            cos, sin = self.rotary(torch.arange(T, device=device))
            return AttentionContext(cos, sin)
        if input_lens is None:
            input_lens = torch.full((B,), T, device=device, dtype=torch.long)
        offsets = torch.arange(T, device=device)
        positions = cache.lens[:, None] + offsets  # [B, T]
        cos, sin = self.rotary(positions)
        valid = offsets[None] < input_lens[:, None]
        slots = cache.slots(positions)
        if bool((valid & (slots < 0)).any()):
            raise ValueError(
                f"KV cache overflow: a row needs {int((cache.lens + input_lens).max())} slots but owns "
                f"{int(cache.capacity.min())}; allocate a bigger cache or fewer tokens"
            )
        write_rows = valid.flatten().nonzero().squeeze(1)
        ctx = AttentionContext(cos, sin, cache, write_slots=slots.flatten()[write_rows], write_rows=write_rows)
        ctx.input_lens = input_lens
        ctx.fresh = int(cache.lens.max()) == 0
        if not ctx.fresh:
            total = cache.lens + input_lens
            L = int(total.max())
            keys = torch.arange(L, device=device)
            read = cache.slots(keys.expand(B, L))
            ctx.read_slots = read.clamp(min=0)
            # Query (b, t) at position lens_b + t sees keys at positions <= its own, within the row's length.
            ctx.mask = ((keys[None, None] <= positions[..., None]) & (keys[None, None] < total[:, None, None]))[:, None]
        return ctx

    def _past_context(
        self, B: int, T: int, past: list[tuple[torch.Tensor, ...]], attention_mask: torch.Tensor | None
    ) -> AttentionContext:
        if len(past) != self.config.num_hidden_layers:
            raise ValueError(f"past holds {len(past)} layers; this model has {self.config.num_hidden_layers}")
        P, device = past[0][0].shape[1], past[0][0].device
        offsets = torch.arange(T, device=device)
        keys = torch.arange(P + T, device=device)
        causal = keys[None, None] <= (P + offsets)[None, :, None]  # [1, T, P + T]
        if attention_mask is None:
            positions, mask = (P + offsets)[None].expand(B, T), causal.expand(B, T, P + T)
        else:
            real = attention_mask.to(torch.bool)
            # A left-padded row's first real token is position 0; padding keeps position 0 and is never attended.
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
            # A padding query still attends to itself, so no row of the mask is all False (SDPA would give NaN).
            mask = (causal & real[:, None]) | (keys[None, None] == (P + offsets)[None, :, None])
        cos, sin = self.rotary(positions)
        return AttentionContext(cos, sin, mask=mask[:, None], fresh=False, past=past, present=[()] * len(past))

    def new_past(self, batch_size: int, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Empty contiguous past entries (P = 0) for `forward(..., past=)`, one tuple per layer."""
        c, p = self.config, self.embed_tokens.weight
        dtype = dtype or p.dtype
        if c.attention_type == "mla":
            shapes = [(batch_size, 0, c.kv_lora_rank + c.qk_rope_head_dim)]
        else:
            shapes = [(batch_size, 0, c.num_key_value_heads, c.head_dim)] * 2
        return [tuple(torch.zeros(s, dtype=dtype, device=p.device) for s in shapes) for _ in range(c.num_hidden_layers)]

    def _mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Depth k sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}, i.e. labels shifted k further."""
        T, losses = input_ids.shape[1], []
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.rotary(torch.arange(T - k, device=h.device))
            h = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), AttentionContext(cos, sin))
            normed = module.norm(h)
            losses.append(self._loss(normed, None if self._fused_loss() else self.lm_head(normed), labels[:, k:]))
        return torch.stack(losses).mean()

    def mtp_step(
        self,
        depth: int,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        cache: KVCache | None = None,
        input_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module at inference (self-speculative drafting): returns (logits, its hidden states).

        `hidden` [B, T, D] are the previous depth's states at positions p..p+T-1, `next_ids` [B, T] the tokens at
        p+1..p+T. With a cache, the module's own KV layer (pool layer num_hidden_layers + depth) is appended like a
        main layer's; the module lags the main model by one token, so give it its own `KVCache` view (same pool and
        block table, its own `lens`).
        """
        module = self.mtp[depth]
        B, T = next_ids.shape
        ctx = self.attention_context(B, T, hidden.device, cache, input_lens)
        h = module(hidden, self.embed_tokens(next_ids), ctx)
        if cache is not None:
            cache.lens += input_lens if input_lens is not None else T
        return self.lm_head(module.norm(h)), h

    # --- MoE balancing --------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[str, MoE]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_balance_bias(self, rate: float) -> None:
        """Aux-loss-free balancing: nudge every router's bias by ±rate from the load since the last call. A frozen
        router (its layer is not being fine-tuned) keeps its bias: frozen means the layer computes what it did."""
        for _, moe in self.moe_layers():
            if moe.tokens_per_expert is not None:
                if moe.gate.weight.requires_grad:
                    moe.gate.update_bias(moe.tokens_per_expert, rate)
                moe.tokens_per_expert = None

    def expert_load(self) -> dict[str, torch.Tensor]:
        """Fraction of routed tokens per expert in each MoE layer since the last bias update."""
        return {
            name: (m.tokens_per_expert / m.tokens_per_expert.sum()).cpu()
            for name, m in self.moe_layers()
            if m.tokens_per_expert is not None
        }

    # --- accounting ---------------------------------------------------------------------------------------------
    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """Parameters (embedding included, tied weights once); `active` counts only top-k of each MoE's experts."""
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not include_mtp:
                continue
            n = p.numel()
            if active and ".experts." in name:
                n = n * self.config.num_experts_per_tok // self.config.n_routed_experts
            total += n
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(active non-embedding params) + attention's 6·layers·heads·(d_qk + d_v)·T/2·2."""
        c = self.config
        n = self.num_params(active=True) - self.embed_tokens.weight.numel()
        if c.attention_type == "mla":
            qk, v = c.qk_head_dim, c.v_head_dim
        else:
            qk = v = c.head_dim
        # Causal attention touches T/2 keys per query on average: QK^T and AV are each 2·T/2·d FLOPs forward.
        attention = c.num_hidden_layers * c.num_attention_heads * (qk + v) * seq_len
        return 6 * n + 3 * attention

    # --- inference and interop ------------------------------------------------------------------------------------
    def new_cache(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None, block_size: int = 16
    ) -> KVCache:
        p = self.embed_tokens.weight
        return new_cache(self.config, batch_size, max_seq_len, dtype or p.dtype, p.device, block_size)
