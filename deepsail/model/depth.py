"""Dynamic depth: Mixture-of-Depths routing in training, confidence-based early exit at inference.

Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258), `mod_capacity` > 0: every `mod_every`-th block gets a
router, one logit per token. In training the top `mod_capacity` fraction of each sequence's tokens (by that logit)
receive the block's update, weighted by sigmoid(logit) so the router learns from the loss; the others pass the
block unchanged and skip its MLP — the block's MLP (dense or MoE) runs on the routed tokens only. Top-k over a
sequence looks at the future, so the router is also trained (binary cross-entropy, the paper's auxiliary-loss
variant) to predict its own top-k membership, and inference routes causally: a token takes the block when its logit
is > 0. Evaluation and cached decode both route that way, so they agree (tested: cached decode == full forward).

How the cache stays consistent: attention inside a routed block still runs for every token, so every token writes
its keys/values at every layer (computed from the residual stream it enters the block with); routing decides only
whether the block's output is added. A later token therefore finds a complete cache whichever layers an earlier
one skipped. What is saved is the MLP of the skipped tokens — two thirds of a block's FLOPs at these widths.

Early exit (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710), `exit_loss_weight` > 0: training adds the shared
head's loss at the exits (after each block of the upper half but the last) to the usual loss, so intermediate
states are readable by the head. `early_exit_logits` then decodes one token at a time and stops after the first
exit where the head's top probability reaches `threshold`; the layers it skipped still write the token's
keys/values, computed from the exited state (CALM's state propagation, Schuster et al. 2022), so the cache again
stays complete. `calibrate_exit` picks the lowest threshold whose validation loss stays within a tolerance of the
full model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import Linear
from deepsail.model.loss import IGNORE_INDEX, linear_cross_entropy


def routes(config: ModelConfig, layer_idx: int) -> bool:
    """Whether block `layer_idx` has a Mixture-of-Depths router (every mod_every-th block, never the first)."""
    every = config.mod_every
    return config.mod_capacity > 0 and 0 < layer_idx < config.num_hidden_layers and layer_idx % every == every - 1


def exit_layers(config: ModelConfig) -> list[int]:
    """Blocks after which a token may exit: the upper half, the last block aside (it is the full model)."""
    L = config.num_hidden_layers
    return list(range(L // 2, L - 1))


class DepthRouter(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.capacity = config.mod_capacity
        self.proj = Linear(config.hidden_size, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, block: nn.Module, x_BTD: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, D = x_BTD.shape
        logit_BT = self.proj(x_BTD).squeeze(-1).float()
        if self.training:
            k = max(1, math.ceil(self.capacity * T))
            top = logit_BT.topk(k, dim=-1).indices
            chosen_BT = torch.zeros_like(logit_BT, dtype=torch.bool).scatter_(1, top, True)
            # the causal router inference uses: predict top-k membership from the token alone (on a detached input:
            # this loss trains the router, not the residual stream)
            aux_BT = self.proj(x_BTD.detach()).squeeze(-1).float()
            self.aux_loss = F.binary_cross_entropy_with_logits(aux_BT, chosen_BT.float())
        else:
            chosen_BT = logit_BT > 0
        attn = block.self_attn(block.input_layernorm(x_BTD), ctx)  # every token: its keys/values are written
        h_BTD = x_BTD + attn
        rows = chosen_BT.flatten().nonzero().squeeze(1)
        mlp = torch.zeros_like(h_BTD).view(-1, D)
        if len(rows):
            h_sel = h_BTD.reshape(-1, D).index_select(0, rows)[None]
            mlp = mlp.index_copy(0, rows, block.mlp(block.post_attention_layernorm(h_sel))[0].to(mlp.dtype))
        weight = torch.sigmoid(logit_BT).to(x_BTD.dtype)[..., None] * chosen_BT[..., None]
        return x_BTD + weight * (attn + mlp.view(B, T, D))


def exit_loss(model: nn.Module, states: Sequence[torch.Tensor], labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of the shared head (final norm + lm_head) read at each exit state."""
    losses = []
    for h in states:
        normed = model.norm(h)
        if model._fused_loss():
            losses.append(linear_cross_entropy(normed, model.lm_head.weight, labels_BT))
        else:
            logits = model.lm_head(normed).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX))
    return torch.stack(losses).mean()


@torch.no_grad()
def early_exit_logits(model: nn.Module, ids_BT: torch.Tensor, cache: Any, threshold: float) -> tuple[torch.Tensor, int]:
    """One decode step (T new tokens per row on the paged `cache`) that stops after the first exit layer where every
    row's top next-token probability is >= `threshold` (1.0: never). Returns (logits of each row's last token
    [B, V], the number of blocks run). The skipped blocks still write the tokens' keys/values, from the exited
    state, so the next step reads a complete cache."""
    B, T = ids_BT.shape
    ctx = model.attention_context(B, T, ids_BT.device, cache, None)
    x = model.embed_tokens(ids_BT)
    exits = set(exit_layers(model.config)) if threshold < 1.0 else set()
    ran = len(model.layers)
    for i, block in enumerate(model.layers):
        x = block(x, ctx)
        if i in exits:
            logits = model.logits_of(x[:, -1]).float()
            if bool((logits.softmax(-1).amax(-1) >= threshold).all()):
                for later in model.layers[i + 1 :]:
                    later.self_attn.write_kv(later.input_layernorm(x), ctx)
                ran = i + 1
                break
    else:
        logits = model.logits_of(x[:, -1]).float()
    cache.lens += T
    return logits, ran


@torch.no_grad()
def exit_scores(model: nn.Module, ids_T: torch.Tensor, threshold: float, prefix: int = 1) -> dict[str, float]:
    """Teacher-forced next-token loss (nats/token) and mean blocks run when each of `ids_T`'s tokens after the
    first `prefix` is decoded one at a time with early exit at `threshold`."""
    model.eval()
    cache = model.new_cache(1, len(ids_T), block_size=16)
    logits, _ = early_exit_logits(model, ids_T[None, :prefix], cache, 1.0)  # the prompt at full depth
    nll, depth = [], []
    for t in range(prefix, len(ids_T)):
        nll.append(-logits.log_softmax(-1)[0, ids_T[t]].item())
        logits, ran = early_exit_logits(model, ids_T[None, t : t + 1], cache, threshold)
        depth.append(ran)
    return {"loss": sum(nll) / len(nll), "blocks": sum(depth) / len(depth)}


def calibrate_exit(
    model: nn.Module,
    val_ids: Sequence[torch.Tensor],
    tolerance: float = 0.02,
    thresholds: Sequence[float] = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5),
) -> tuple[float, list[dict[str, float]]]:
    """The lowest threshold (the most exits) whose validation loss stays within `tolerance` (relative) of the
    full-depth loss, and every threshold's scores. 1.0 (no exit) when none qualifies."""

    def score(th: float) -> dict[str, float]:
        runs = [exit_scores(model, ids, th) for ids in val_ids]
        return {"threshold": th, **{k: sum(r[k] for r in runs) / len(runs) for k in ("loss", "blocks")}}

    full = score(1.0)
    table = [full] + [score(th) for th in sorted(thresholds, reverse=True)]
    ok = [r for r in table[1:] if r["loss"] <= full["loss"] * (1 + tolerance)]
    return (min(r["threshold"] for r in ok) if ok else 1.0), table
