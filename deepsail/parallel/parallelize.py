"""`parallelize(model, cfg)`: everything a training run does to a built model, in one place and one order.

The model code (`deepsail.model`) is written for one device and knows none of this. As in torchtitan's
`parallelize`, the order is fixed because each step must see what the previous one produced:

    1. tensor / expert parallelism   (shards the weights; not yet: one process)
    2. activation checkpointing      (wraps each block; must wrap the sharded block)
    3. torch.compile                 (traces what the wrappers do)
    4. FSDP                          (not yet)

Checkpointing wraps blocks in place with PyTorch's own `checkpoint_wrapper`, whose state-dict and
named-parameter hooks hide the wrapper, so checkpoints and HF exports keep their names. Compilation does not
touch the model: it returns the compiled callable the training step runs, while evaluation and saving use the
eager model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every decoder block (main layers and MTP modules) in backward instead of keeping its
    activations: ~one extra forward per step, for memory that no longer grows with depth."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    def wrap(block: nn.Module) -> nn.Module:
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

    for i, block in enumerate(model.layers):
        model.layers[i] = wrap(block)
    for module in getattr(model, "mtp", ()):
        module.block = wrap(module.block)
    return model


def apply_compile(model: nn.Module) -> Any:
    """torch.compile for the training forward/backward; the eager `model` stays what is evaluated and saved."""
    return torch.compile(model)


# --compile is offered where it pays. On CPU it does not yet: deepseek-v3-mini bf16 8x256 trains at 2,169 tok/s
# compiled vs 2,265 eager (0.96x) after 125 s of compiling (torch 2.13, 2-core Zen 4; the MoE dispatch breaks the
# graph), so a CPU run warns and trains eager. ds.compile(..., optimize_for="training") still compiles on request.
COMPILE_PAYS_ON = ("cuda",)


def parallelize(model: nn.Module, cfg: Any) -> Any:
    """Apply the techniques `cfg` (a TrainConfig) asks for; returns what the training step calls."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if not cfg.compile:
        return model
    device = next(model.parameters()).device.type
    if device not in COMPILE_PAYS_ON:
        warnings.warn(
            f"--compile: torch.compile trains slower than eager on {device} (0.96x measured on deepseek-v3-mini, "
            "after minutes of compiling); training eager",
            stacklevel=2,
        )
        return model
    return apply_compile(model)
