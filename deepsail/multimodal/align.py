"""Contrastive image-text alignment (CLIP, Radford et al. 2021; open_clip's loss and temperature handling).

    text ids [B, T] -> TextEncoder: deepsail's own decoder blocks run bidirectionally (no causal mask, a padding
                       mask instead), final norm, mean over the real tokens -> [B, Dt]
    images -> VisionEncoder (vision.py) pooled -> [B, Dv]
    both -> a linear projection each -> L2-normalised [B, E]; logits = exp(t) * img @ txt.T

The loss is the symmetric InfoNCE over the batch: each image should pick its caption among the batch's captions,
and each caption its image. The temperature is learned as log(1/τ) from τ = 0.07 and clamped at 100 as CLIP does
(above it training destabilises). Two rows that are the same scene described identically are not negatives of
each other: their targets share the probability mass (procedural scenes of one object repeat within a batch of 256
a few times per batch, and treating them as negatives teaches the model to split identical images).

Under torchrun (an initialised process group), each rank's embeddings are all-gathered with their gradients
(`torch.distributed.nn.all_gather`, open_clip's `gather_with_grad`), so the negatives are the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.attention import AttentionContext
from deepsail.model.config import ModelConfig, config_from_seed
from deepsail.model.layers import Linear, RMSNorm, RotaryEmbedding
from deepsail.model.transformer import Block
from deepsail.multimodal.vision import VisionConfig, VisionEncoder

MAX_LOGIT_SCALE = math.log(100.0)

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "text-tiny": dict(layers=2, heads=4, hidden=128),
    "text-small": dict(layers=4, heads=4, hidden=256),
}


def text_config(preset: str, vocab_size: int, max_len: int = 128) -> ModelConfig:
    """A dense Llama-style config (GQA attention, SwiGLU) for the text encoder; MoE brings nothing at this size."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {preset!r}; choose one of {sorted(TEXT_PRESETS)}")
    return config_from_seed(
        **TEXT_PRESETS[preset],
        vocab=vocab_size,
        experts=0,
        mtp=0,
        attention="gqa",
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )


class TextEncoder(nn.Module):
    """deepsail blocks over the tokenizer's ids, bidirectional; pooled by the mean of the real tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i, moe=False) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        std = config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x_BTD: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
        """The blocks over any embedded sequence (fusion.py prepends image tokens), bidirectional, padding masked;
        returns the final-normed states [B, T, D]."""
        T = x_BTD.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"a text of {T} tokens exceeds the encoder's {self.config.max_position_embeddings}")
        cos, sin = self.rotary(torch.arange(T, device=x_BTD.device))
        ctx = AttentionContext(cos, sin, mask=real_BT.to(torch.bool)[:, None, None, :], causal=False)
        for block in self.layers:
            x_BTD = block(x_BTD, ctx)
        return self.norm(x_BTD)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T], mask [B, T] (1 = real token) -> (token states [B, T, D], pooled [B, D])."""
        x = self.encode(self.embed_tokens(ids_BT), mask_BT)
        weights = mask_BT.to(x.dtype)[..., None]
        return x, (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and mask [B, T] for the text encoder; texts over max_len tokens are cut."""
    rows = [ids[:max_len] or [tokenizer.pad_id] for ids in tokenizer.encode_batch(list(texts))]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order, with gradients flowing back to each rank's own; identity in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # backward: a reduce-scatter, so each rank's rows get the gradient of every rank's (identical) loss, summed
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def contrastive_loss(
    image_BE: torch.Tensor,
    text_BE: torch.Tensor,
    logit_scale: torch.Tensor,
    same_BB: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings. `same_BB[i, j]`: rows i and j are the same pair (their targets
    share the mass; the diagonal must be True). Across ranks the embeddings are gathered first."""
    image_BE, text_BE = gather_with_grad(image_BE), gather_with_grad(text_BE)
    logits = logit_scale.exp() * image_BE.float() @ text_BE.float().T  # [B, B]: image i against caption j
    if same_BB is None:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    same = same_BB.to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ContrastiveModel(nn.Module):
    """The CLIP pair: image and text towers, a projection each into a shared `embed_dim` space, a temperature."""

    def __init__(self, vision: VisionConfig, text: ModelConfig, embed_dim: int = 128) -> None:
        super().__init__()
        self.vision = VisionEncoder(vision)
        self.text = TextEncoder(text)
        self.image_proj = Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_proj = Linear(text.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vision.hidden_size**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> normalised [B, E]."""
        return F.normalize(self.image_proj(self.vision(images).pooled), dim=-1)

    def encode_text(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] ids + mask -> normalised [B, E]."""
        return F.normalize(self.text_proj(self.text(ids_BT, mask_BT)[1]), dim=-1)

    def clamp_logit_scale(self) -> None:
        """CLIP clamps the learned temperature after every step (here: before each forward, which is the same)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(
        self, images: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor, same_BB: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.clamp_logit_scale()
        return contrastive_loss(self.encode_image(images), self.encode_text(ids_BT, mask_BT), self.logit_scale, same_BB)
