"""AdamW with the usual two parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from deepsail.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW where only matrices decay.

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
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass per dtype/device (CUDA, and CPU since 2.4);
    # foreach (one kernel per op over all tensors) is the fallback everywhere else.
    device_type = next(model.parameters()).device.type
    fused = device_type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else True
    )


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
