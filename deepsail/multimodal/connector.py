"""Image-conditioned generation, LLaVA-style (Liu et al. 2023): image features become prefix tokens of a decoder.

    image -> VisionEncoder patches [B, N, Dv] -> (optional p x p average pool of the patch grid)
          -> Connector: Linear -> GELU -> Linear (LLaVA-1.5's projector) -> [B, N', D_decoder]
    chat ids with one <|image|> per image, expanded to N' placeholder ids
          -> the decoder's token embeddings, the placeholders' rows replaced by the image tokens in order
          -> an ordinary deepsail Transformer (`inputs_embeds`), trained with the loss on the assistant's tokens

The decoder is a plain deepsail model: it saves as an HF folder (config.json + model.safetensors) beside the image
prefix's weights (`vision.safetensors`), so `generate`/`serve` load it as they load any model, and serving
(infer/engine.py `image_embeds`) swaps the placeholders' embeddings exactly as training does here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import Linear
from deepsail.model.loss import IGNORE_INDEX
from deepsail.model.transformer import ModelOutput, Transformer
from deepsail.multimodal.vision import VisionConfig, VisionEncoder

IMAGE_TOKEN = "<|image|>"  # one per image in a chat's text; expanded to `num_tokens` placeholder ids
CAPTION_PROMPT = "describe the image."


class ImagePrefix(nn.Module):
    """Images -> the decoder-width tokens that stand for them: [B, 3, H, W] -> [B, num_tokens, D]."""

    def __init__(self, vision: VisionConfig, width: int, pool: int = 1) -> None:
        super().__init__()
        if pool < 1 or vision.grid % pool:
            raise ValueError(f"pool={pool} must divide the {vision.grid}x{vision.grid} patch grid")
        self.vision = VisionEncoder(vision)
        self.pool = pool
        self.connector = nn.Sequential(
            Linear(vision.hidden_size, width, bias=True), nn.GELU(), Linear(width, width, bias=True)
        )
        for m in self.connector:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Each image token's place in the (pooled) grid: the decoder otherwise knows it only from the token's
        # offset in the sequence, and a 2-D rotary ViT keeps positions in its attention, not in its features.
        self.pos = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    @property
    def num_tokens(self) -> int:
        return (self.vision.config.grid // self.pool) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.vision(images).patches  # [B, N, Dv]
        if self.pool > 1:
            B, N, D = patches.shape
            g = self.vision.config.grid
            grid = patches.transpose(1, 2).reshape(B, D, g, g)
            patches = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.connector(patches) + self.pos


def expand_image_tokens(ids: Sequence[int], image_id: int, n: int) -> list[int]:
    """Each image placeholder id becomes n of them (the rows the image's tokens will fill)."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * n if i == image_id else [i])
    return out


def chat_prompt(tokenizer: Any, image_id: int, n_tokens: int, prompt: str = CAPTION_PROMPT) -> list[int]:
    """The generation prompt of a captioner: a user turn holding the image and `prompt`, then the assistant tag."""
    ids = tokenizer.encode_chat([{"role": "user", "content": IMAGE_TOKEN + prompt}], add_generation_prompt=True)[0]
    return expand_image_tokens(ids, image_id, n_tokens)


def chat_example(tokenizer: Any, image_id: int, n_tokens: int, prompt: str, answer: str) -> tuple[list, list]:
    """(input ids, next-token targets on the assistant's turn) of one image chat, the image expanded."""
    messages = [{"role": "user", "content": IMAGE_TOKEN + prompt}, {"role": "assistant", "content": answer}]
    ids, mask = tokenizer.encode_chat(messages)
    out_ids, out_mask = [], []
    for t, m in zip(ids, mask):
        k = n_tokens if t == image_id else 1
        out_ids += [t] * k
        out_mask += [m] * k
    return out_ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(out_ids[1:], out_mask[1:])]


def splice_images(
    embeds_BTD: torch.Tensor, ids_BT: torch.Tensor, image_id: int, image_tokens: torch.Tensor
) -> torch.Tensor:
    """Put `image_tokens` [M, N', D] (one image per M, in reading order over the batch) into the placeholder rows."""
    slots = ids_BT == image_id
    need = int(slots.sum())
    if need != image_tokens.shape[0] * image_tokens.shape[1]:
        raise ValueError(
            f"the text holds {need} image placeholders but {image_tokens.shape[0]} image(s) give "
            f"{image_tokens.shape[0] * image_tokens.shape[1]} tokens ({image_tokens.shape[1]} each)"
        )
    out = embeds_BTD.clone()
    out[slots] = image_tokens.reshape(-1, image_tokens.shape[-1]).to(out.dtype)
    return out


class Captioner(nn.Module):
    """Image prefix + deepsail decoder. `forward(images, ids, labels)` -> the decoder's ModelOutput with its loss."""

    def __init__(self, vision: VisionConfig, decoder: ModelConfig, image_token_id: int, pool: int = 1) -> None:
        super().__init__()
        if not 0 <= image_token_id < decoder.vocab_size:
            raise ValueError(f"image token id {image_token_id} is outside the decoder's vocabulary")
        self.prefix = ImagePrefix(vision, decoder.hidden_size, pool)
        self.decoder = Transformer(decoder)
        self.image_token_id = image_token_id

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    def embed(self, ids_BT: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return splice_images(self.decoder.embed_tokens(ids_BT), ids_BT, self.image_token_id, self.prefix(images))

    def forward(self, images: torch.Tensor, ids_BT: torch.Tensor, labels_BT: torch.Tensor | None = None) -> ModelOutput:
        return self.decoder(ids_BT, labels_BT, inputs_embeds=self.embed(ids_BT, images))
