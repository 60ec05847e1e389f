"""AdamW with the usual two parameter groups (`ds.Adam`, which the trainer builds too), and the warmup + cosine
learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from deepsail.train.config import TrainConfig


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups, where only matrices decay.

    Weight decay pulls weights toward zero. That is a useful prior for the linear maps, but not for
    norm gains (which should sit near 1), biases, or embedding rows (a rare token's row would be
    shrunk on every step it is absent). So: matrices of linear layers decay; parameters with fewer
    than two dims and every nn.Embedding weight (including a head tied to it) do not.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() de-duplicates tied weights
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [part for g in groups for part in _by_layout(g)]


def _by_layout(group: dict[str, Any]) -> list[dict[str, Any]]:
    """A group split by where its tensors live: under tensor/expert parallelism some parameters are DTensors on one
    mesh, some on another, some plain, and torch's fused and foreach AdamW kernels refuse to mix them in one call.
    One process: one part, unchanged."""
    from torch.distributed.tensor import DTensor

    parts: dict[Any, list[torch.Tensor]] = {}
    for p in group["params"]:
        parts.setdefault((p.device_mesh, p.placements) if isinstance(p, DTensor) else None, []).append(p)
    return [{**group, "params": params} for params in parts.values()] or [group]


class Adam(torch.optim.AdamW):
    """`ds.Adam`: the optimizer the trainer uses (torch's AdamW, fused where torch has the kernel), as a door.

        optimizer = ds.Adam(model.parameters(), lr=1e-3)          # as torch.optim.Adam is called
        optimizer = ds.Adam(model, lr=3e-4, weight_decay=0.1)     # the trainer's groups: only matrices decay

    With the default weight_decay=0 this is exactly Adam (AdamW's decoupled decay of 0 is no decay). A nonzero
    weight_decay is AdamW's decoupled decay, as the trainer applies it, not torch.optim.Adam's L2 term added to the
    gradient. Given parameters (or torch-style groups) it decays all of them, as torch does; given a model it
    decays only the matrices and skips frozen parameters (`decay_groups`). The betas and eps default to Adam's
    (0.9, 0.999) and 1e-8; `deepsail pretrain` passes its own (--beta2 0.95).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if isinstance(params, nn.Module):
            groups = decay_groups(params, weight_decay)
        else:  # model.parameters() is an iterator: read it once, here
            groups = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
        first = next((p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])), None)
        if first is None:
            raise ValueError("ds.Adam got no trainable parameters (an empty list, or a model with all of them frozen)")
        # The fused kernel does the whole update in one pass per dtype/device (CUDA, and CPU since 2.4); foreach
        # (one kernel per op over all tensors) is the fallback everywhere else.
        fused = first.device.type in _get_fused_kernels_supported_devices()
        super().__init__(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused, foreach=None if fused else True
        )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Adam:
    """The trainer's optimizer: `ds.Adam` on the model's decay groups with the run's lr, betas, eps and decay."""
    return Adam(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup over the first `warmup_steps` steps (starting at lr/warmup, not 0, so step 0
    already learns), then a cosine from `lr` down to `min_lr` as `progress` goes 0 -> 1.
    `progress` is how far through the decay phase the run is (see `decay_progress`).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine


def decay_progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Fraction of the cosine decay done: by steps after warmup, by wall clock, or the further of the two.

    A step-limited run decays over steps [warmup_steps, steps). A time-limited run cannot know its
    step count in advance, so it decays over its time budget instead; it is then not bitwise
    reproducible (the lr depends on how fast the machine was), which step-limited runs are.
    """
    fractions = [0.0]
    if cfg.steps is not None:
        fractions.append((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.minutes is not None:
        fractions.append(elapsed_s / (60.0 * cfg.minutes))
    return min(1.0, max(fractions))
