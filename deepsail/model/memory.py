"""Segment memory (Transformer-XL, Dai et al. 2019, arXiv 1901.02860): a long document read in segments, each
attending to the keys/values the previous ones left behind.

The memory is the `past` a forward already takes (per layer: MLA's latent + rope key, or GQA's keys and values)
holding the last `memory_len` tokens, detached: no gradient flows into an earlier segment, so a step costs one
segment's backward while its attention reaches `memory_len` tokens further back.

Positions stay relative, as Transformer-XL requires, through RoPE itself: attention depends only on the difference
of a query's and a key's rotation. The new segment's tokens sit at positions M..M+T-1 after M memory entries; the
entries kept for the next segment were rotated at positions T..T+M-1 of this one, so their rope part is rotated back
by T (R(p - T) = R(-T) R(p)) to sit at 0..M-1 again. Positions never grow with the document, and segment k with a
memory that covers everything before it computes exactly the logits a forward over the whole document would
(tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shift_positions(model: nn.Module, past: list[tuple[torch.Tensor, ...]], by: int) -> list[tuple[torch.Tensor, ...]]:
    """`past` entries rotated as if each were `by` positions earlier (only the rope part of a key moves)."""
    c = model.config
    angles = by * model.rotary.inv_freq(past[0][0].device)  # [rope/2]; no YaRN attention factor: a pure rotation
    cos, sin = angles.cos(), -angles.sin()  # R(-by)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # stored keys are in [real halves | imaginary halves] layout
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    if c.attention_type == "mla":
        r = c.kv_lora_rank
        return [(torch.cat((latent[..., :r], rotate(latent[..., r:])), dim=-1),) for (latent,) in past]
    return [(rotate(k), v) for k, v in past]


class SegmentMemory:
    """The memory of B streams read segment by segment: `forward` runs the model on the next segment of each
    stream with the memory as its past, then keeps the last `memory_len` entries (detached) for the next one."""

    def __init__(self, memory_len: int) -> None:
        if memory_len < 1:
            raise ValueError(f"memory_len must be >= 1, got {memory_len}")
        self.memory_len = memory_len
        self.past: list[tuple[torch.Tensor, ...]] | None = None

    def reset(self) -> None:
        self.past = None

    def forward(self, model: nn.Module, x_BT: torch.Tensor, **kwargs: Any) -> Any:
        """`model(x_BT, past=memory, **kwargs)` (labels, return_hidden, ...), and the memory moves on."""
        past = self.past if self.past is not None else model.new_past(x_BT.shape[0])
        if past[0][0].shape[0] != x_BT.shape[0]:
            raise ValueError(f"the memory holds {past[0][0].shape[0]} streams; this segment has {x_BT.shape[0]} rows")
        out = model(x_BT, past=past, **kwargs)
        L = out.present[0][0].shape[1]
        keep = min(self.memory_len, L)
        kept = [tuple(t[:, L - keep :].detach() for t in layer) for layer in out.present]
        self.past = shift_positions(model, kept, L - keep)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"memory_len": self.memory_len, "past": self.past}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory_len, self.past = state["memory_len"], state["past"]
