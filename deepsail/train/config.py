"""TrainConfig: every knob of a pretraining run, in one flat dataclass.

The `deepsail pretrain` flags mirror these fields one to one (`batch_size` -> `--batch-size`), and
every run writes the resolved config to `<out>/config.json`, so a run directory says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    # --- where ---
    data: str = ""  # a tokenized data directory (has manifest.json), as written by `deepsail data prepare`
    out: str = "runs/pretrain"  # run directory: config, metrics, plots, checkpoints
    tokenizer: str = ""  # the data's tokenizer folder; default: the data folder, else the path its manifest records
    model_preset: str = "deepseek-v3-debug"  # a ModelConfig preset name
    device: str = "auto"  # auto = cuda if available, else cpu

    # --- how long: stop at whichever limit comes first (at least one is required) ---
    steps: int | None = 1000  # optimizer steps
    max_minutes: float | None = None  # wall-clock budget, checkpoints and evals included

    # --- batch: tokens per optimizer step = batch_size * grad_accum * seq_len ---
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step

    # --- optimizer (AdamW) and schedule (linear warmup, cosine decay to min_lr) ---
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings get none
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)

    # --- numerics and memory ---
    precision: Precision = "auto"  # auto = bf16 on CUDA with bf16 or on CPUs with AMX/AVX512-BF16, else fp32
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model for the training forward/backward

    # --- MoE: aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2 uses gamma = 0.001) ---
    bias_update_rate: float = 1e-3

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 200  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per pass (fixed order, same every time)
    log_every: int = 10  # steps between metric rows (loss is synced to the host only then)
    ckpt_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field, what it was, and what would work."""
        if self.steps is None and self.max_minutes is None:
            raise ValueError("TrainConfig needs a length: set steps (--steps N) or max_minutes (--minutes M), or both.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}.")
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {self.precision!r}.")
        if not math.isfinite(self.lr) or not math.isfinite(self.min_lr):
            raise ValueError(f"lr and min_lr must be finite, got lr={self.lr}, min_lr={self.min_lr}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**d)
