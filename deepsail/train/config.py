"""TrainConfig: every knob of a training run, in one flat dataclass.

Each field is a `knob`: its help text here is the `--flag`'s help on every verb that trains (`deepsail pretrain`
takes them all, `deepsail run` a few with its own defaults), so a knob has one name everywhere (`minutes` <->
`--minutes`). Every run writes the resolved config to `<out>/run_config.json`, so a run directory says how it was
made, and `--resume` continues from the config saved in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from deepsail.flags import knob
from deepsail.precision import DEVICE_HELP, PRECISION_HELP, parse_precision


@dataclass
class TrainConfig:
    # --- where ---
    data: str = knob("", "Tokenized data folder (has manifest.json), made by `deepsail data prepare`.")
    out: str = knob(
        "runs/pretrain", "Run folder: run_config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/."
    )
    tokenizer: str = knob(
        "",
        "The data's tokenizer folder (default: the data folder, else the path its manifest records).",
        show_default=False,
    )
    model_preset: str = knob(
        "deepseek-v3-debug", "Model preset, e.g. deepseek-v3-debug, deepseek-v3-mini, deepseek-v3-small."
    )
    arch: tuple[str, ...] = knob(
        (),
        "Change one field of the preset's ModelConfig, as KEY=VALUE (repeatable), e.g. --arch attn_gate=headwise "
        "--arch num_hidden_layers=4.",
        show_default=False,
    )
    init: str = knob(
        "",
        "Start from this model's weights (a model or run folder, e.g. `deepsail upcycle`'s output) at step 0 with a "
        "fresh optimizer; the model's own config replaces --model-preset.",
        show_default=False,
    )
    device: str = knob("auto", DEVICE_HELP + ".")

    # --- how long: stop at whichever limit comes first (at least one is required) ---
    steps: int | None = knob(1000, "Optimizer steps (1000 unless only --minutes is given).")
    minutes: float | None = knob(
        None, "Wall-clock budget, evals and checkpoints included; with --steps too, whichever comes first ends the run."
    )

    # --- batch: tokens per optimizer step = batch_size * grad_accum * seq_len ---
    batch_size: int = knob(8, "Sequences per micro-batch.")
    seq_len: int = knob(256, "Tokens per sequence.")
    grad_accum: int = knob(1, "Micro-batches per optimizer step.")

    # --- optimizer (AdamW) and schedule (linear warmup, cosine decay to min_lr) ---
    lr: float = knob(3e-4, "Peak learning rate (after warmup).")
    min_lr: float = knob(3e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = knob(100, "Linear warmup steps.")
    weight_decay: float = knob(0.1, "AdamW weight decay, on matrices only (norms, biases, embeddings get none).")
    beta1: float = knob(0.9, "AdamW beta1.")
    beta2: float = knob(0.95, "AdamW beta2.")
    eps: float = knob(1e-8, "AdamW epsilon.")
    grad_clip: float = knob(1.0, "Max global gradient norm; 0 disables clipping (the norm is still logged).")
    dropout: float = knob(0.0, "Residual dropout on each block's attention and MLP output (training only).")
    dropout_end: float | None = knob(
        None, "Dropout schedule: move linearly from --dropout to this by the end of the run (e.g. 0.3 -> 0.1)."
    )

    # --- numerics and memory ---
    precision: str = knob(
        "auto",
        PRECISION_HELP + "; auto = bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else "
        "fp32; fp16 uses dynamic loss scaling.",
    )
    activation_checkpointing: bool = knob(False, "Recompute each block's activations in backward to save memory.")
    compile: bool = knob(False, "torch.compile the training step (CUDA; slower than eager on CPU: warns, eager).")

    # --- scale-out under torchrun (deepsail/parallel/mesh.py): the product of the four is the number of processes ---
    dp_replicate: int = knob(1, "Whole model copies (DDP; HSDP with --dp-shard/--ep/--tp).")
    dp_shard: int = knob(-1, "FSDP2 shards (ZeRO-3); -1 = the processes the other dimensions leave.")
    ep: int = knob(1, "Expert parallel: MoE routed experts split over this many ranks (all-to-all dispatch).")
    tp: int = knob(1, "Tensor parallel: attention heads, MLP columns and vocabulary split over this many ranks.")
    powersgd_rank: int = knob(0, "DDP gradient compression: PowerSGD rank (e.g. 4); 0 = exact all-reduce.")

    # --- MoE: aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2 uses gamma = 0.001) ---
    bias_update_rate: float = knob(1e-3, "MoE aux-loss-free balancing: bias step per optimizer step (gamma).")

    # --- evaluation, logging, checkpoints ---
    eval_every: int = knob(200, "Steps between validation passes; 0 = only at the end.")
    eval_batches: int = knob(20, "Validation micro-batches per pass (fixed order, the same every time).")
    log_every: int = knob(10, "Steps between metric rows and status lines (loss is synced to the host only then).")
    ckpt_every: int = knob(500, "Steps between checkpoints; 0 = only at the end.")
    keep_last: int = knob(3, "Checkpoints kept on disk (older ones are deleted).")
    seed: int = knob(0, "Seed for init, data order and every RNG.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field, what it was, and what would work."""
        if self.steps is None and self.minutes is None:
            raise ValueError("a run needs a length: set steps (--steps N) or minutes (--minutes M), or both.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"minutes must be > 0, got {self.minutes}.")
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches", "log_every", "keep_last", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("ep", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(
                f"dp_shard must be >= 1, or -1 for the processes the other dimensions leave; got {self.dp_shard}."
            )
        for name in (
            "warmup_steps",
            "eval_every",
            "ckpt_every",
            "grad_clip",
            "weight_decay",
            "bias_update_rate",
            "powersgd_rank",
        ):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be >= 0 and finite, got {value}.")
        if not math.isfinite(self.lr) or not math.isfinite(self.min_lr):
            raise ValueError(f"lr and min_lr must be finite, got lr={self.lr}, min_lr={self.min_lr}.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}.")
        for name in ("dropout", "dropout_end"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        for item in self.arch:
            if "=" not in item:
                raise ValueError(f"--arch {item!r}: expected KEY=VALUE, e.g. attn_gate=headwise")
        if self.arch and self.init:
            raise ValueError("--arch changes a preset; --init takes the model as it is. Use one of them.")
        self.precision = parse_precision(self.precision)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "max_minutes" in d:  # its name in runs saved before the knob was renamed to match --minutes
            d["minutes"] = d.pop("max_minutes")
        if "arch" in d:
            d["arch"] = tuple(d["arch"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**d)
