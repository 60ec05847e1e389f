"""Cross-modal fusion and visual question answering.

    question ids -> TextEncoder (align.py) -> text tokens [B, T, D]
    image -> VisionEncoder (vision.py) -> patches [B, N, Dv] -> linear to D
    num_layers fusion layers, each (pre-norm, residual):
        text tokens attend to the image patches   (what in the picture answers the question)
        image patches attend to the text tokens   (which patches the question is about), padding masked
        an MLP on each stream
    pooled text t and pooled image v -> dynamic modality weights w = softmax(W [t; v]) per example
    -> w_text * t + w_image * v -> answer head (classification over a fixed answer list)

The modality weights are the design's "dynamic modality weights": an input-dependent mix of the two streams,
so a question the text settles alone ("how many objects are there?" still needs the image; "is there a red
circle?" leans on both) sets its own balance. They are returned with the logits; `deepsail mm eval` reports their
mean per question type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import MLP, Linear, RMSNorm
from deepsail.multimodal.align import TextEncoder
from deepsail.multimodal.vision import VisionConfig, VisionEncoder


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim, bias=False)
        self.kv = Linear(dim, 2 * dim, bias=False)
        self.out = Linear(dim, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, other_BSD: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        S = other_BSD.shape[1]
        q = self.q(x_BTD).view(B, T, self.heads, -1).transpose(1, 2)
        k, v = self.kv(other_BSD).view(B, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = mask_BS[:, None, None, :] if mask_BS is not None else None
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))


class FusionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.text_norm, self.image_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.text_to_image = CrossAttention(dim, heads)
        self.image_to_text = CrossAttention(dim, heads)
        self.text_mlp_norm, self.image_mlp_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.text_mlp, self.image_mlp = MLP(dim, 2 * dim), MLP(dim, 2 * dim)

    def forward(
        self, text_BTD: torch.Tensor, image_BND: torch.Tensor, mask_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, v = self.text_norm(text_BTD), self.image_norm(image_BND)
        text_BTD = text_BTD + self.text_to_image(t, v, None)
        image_BND = image_BND + self.image_to_text(v, t, mask_BT)
        text_BTD = text_BTD + self.text_mlp(self.text_mlp_norm(text_BTD))
        return text_BTD, image_BND + self.image_mlp(self.image_mlp_norm(image_BND))


class VQAModel(nn.Module):
    """Answer classification over `num_answers` from an image and a question."""

    def __init__(self, vision: VisionConfig, text: ModelConfig, num_answers: int, fusion_layers: int = 2) -> None:
        super().__init__()
        if num_answers < 2:
            raise ValueError(f"a VQA head needs at least 2 answers; got {num_answers}")
        d = text.hidden_size
        self.vision = VisionEncoder(vision)
        self.text = TextEncoder(text)
        self.image_in = Linear(vision.hidden_size, d, bias=False)
        self.fusion = nn.ModuleList(
            FusionLayer(d, text.num_attention_heads, text.rms_norm_eps) for _ in range(fusion_layers)
        )
        self.text_out, self.image_out = RMSNorm(d, text.rms_norm_eps), RMSNorm(d, text.rms_norm_eps)
        self.modality_gate = Linear(2 * d, 2, bias=True)
        self.head = nn.Sequential(Linear(d, d, bias=True), nn.GELU(), Linear(d, num_answers, bias=True))
        for m in [self.image_in, *self.fusion.modules(), *self.head.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.modality_gate.weight)  # an even mix to start
        nn.init.zeros_(self.modality_gate.bias)

    def forward(
        self,
        images: torch.Tensor,
        ids_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B questions about `images` (question b asks about image `image_index[b]`, default b: several questions
        share one pass of the vision encoder) -> (answer logits [B, A], modality weights [B, 2] as (text, image))."""
        real = mask_BT.to(torch.bool)
        image = self.image_in(self.vision(images).patches)
        if image_index is not None:
            image = image[image_index]
        text, _ = self.text(ids_BT, mask_BT)
        for layer in self.fusion:
            text, image = layer(text, image, real)
        w = real.to(text.dtype)[..., None]
        t = (self.text_out(text) * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
        v = self.image_out(image).mean(dim=1)
        weights = self.modality_gate(torch.cat((t, v), dim=-1)).float().softmax(dim=-1)
        fused = weights[:, :1].to(t.dtype) * t + weights[:, 1:].to(v.dtype) * v
        return self.head(fused), weights
