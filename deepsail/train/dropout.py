"""Residual dropout with a schedule, applied to a model from outside (the model code has no dropout).

GPT-2's "resid_pdrop": each block's attention output and MLP output are dropped (and rescaled) before they join
the residual stream, in training only. The design documents tune a *schedule* — strong early, weaker late (e.g.
0.3 -> 0.1) — so the rate is set every step from how far the run is (`--dropout 0.3 --dropout-end 0.1`: linear in
the run's progress, by steps or wall clock). Forward hooks on `self_attn` and `mlp` keep the model file free of it
and leave checkpoints and HF exports untouched: a model trained with dropout saves and loads as any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDropout:
    """Hooks on every block's attention and MLP (main layers and MTP); `set(p)` changes the rate of all of them."""

    def __init__(self, model: nn.Module, start: float, end: float | None = None) -> None:
        self.start, self.end = start, start if end is None else end
        self.p = start
        self.handles = []
        blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", ())]
        for block in blocks:
            block = getattr(block, "_checkpoint_wrapped_module", block)
            for sub in (block.self_attn, block.mlp):
                self.handles.append(sub.register_forward_hook(self._drop))

    def _drop(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return F.dropout(out, self.p, training=True) if module.training and self.p > 0 else out

    def at(self, progress: float) -> float:
        """The scheduled rate `progress` (0..1) through the run, and sets it."""
        self.p = self.start + (self.end - self.start) * min(max(progress, 0.0), 1.0)
        return self.p

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
