"""Turning prompts into model input: encoding, right-padding a batch, and the context-length check.

Shared by every decode path (`generate`, beam search, speculative decoding), so they agree on what a prompt is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Prompt = str | Sequence[int]


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass one, or pass token ids")
        ids = tokenizer.encode(prompt)
        ids = list(getattr(ids, "ids", ids))  # a raw `tokenizers.Tokenizer` returns an Encoding
        # HF checkpoints that were trained with a BOS in front of every text say so in tokenizer_config.json
        # (DeepSeek-V2/V3/R1 do); deepsail's own tokenizers do not (documents are only separated by EOS).
        bos = getattr(tokenizer, "bos_id", None)
        if getattr(tokenizer, "config", {}).get("add_bos_token") and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    return ids


def pad_rows(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and their [B] lengths."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


def model_device(model: Any) -> torch.device:
    return model.embed_tokens.weight.device


def check_fits(model: Any, rows: Sequence[Sequence[int]], max_tokens: int, extra: int = 0) -> None:
    limit = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest + max_tokens + extra > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_tokens={max_tokens} exceeds the model's context of {limit} tokens; "
            "shorten the prompt or lower max_tokens"
        )
