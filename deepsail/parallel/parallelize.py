"""`parallelize(model, mesh, cfg)`: everything a training run does to a built model, in one place and one order.

The model code (`deepsail.model`) is written for one device and knows none of this. As in torchtitan's
`parallelize`, the order is fixed because each step must see what the previous one produced:

    1. tensor / expert parallelism   (tp.py, ep.py: DTensor shards over the `tp` and `ep` mesh dimensions)
    2. activation checkpointing      (wraps each block; must wrap the sharded block)
    3. torch.compile                 (traces what the wrappers do; per block when distributed, as torchtitan does)
    4. FSDP2 or DDP                  (fsdp.py: shards or replicates what the steps above built)

With `mesh` None (one process) only 2 and 3 apply. Checkpointing wraps blocks in place with PyTorch's own
`checkpoint_wrapper`, whose state-dict and named-parameter hooks hide the wrapper, so checkpoints and HF exports
keep their names. Compilation of a one-process run does not touch the model: it returns the compiled callable the
training step runs, while evaluation and saving use the eager model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from deepsail.parallel.mesh import ParallelMesh


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


def compile_blocks(model: nn.Module) -> None:
    """Compile each block in place (`nn.Module.compile`): FSDP2's per-block gathers then run between compiled
    graphs, and the blocks, all the same code, share one compilation."""
    for block in model.layers:
        block.compile()
    for module in getattr(model, "mtp", ()):
        module.block.compile()


# --compile is offered where it pays. On CPU it does not yet: deepseek-v3-mini bf16 8x256 trains at 2,169 tok/s
# compiled vs 2,265 eager (0.96x) after 125 s of compiling (torch 2.13, 2-core Zen 4; the MoE dispatch breaks the
# graph), so a CPU run warns and trains eager. ds.compile(..., optimize_for="training") still compiles on request.
COMPILE_PAYS_ON = ("cuda",)


def _compile_pays(device: str) -> bool:
    if device not in COMPILE_PAYS_ON:
        warnings.warn(
            f"--compile: torch.compile trains slower than eager on {device} (0.96x measured on deepseek-v3-mini, "
            "after minutes of compiling); training eager",
            stacklevel=3,
        )
        return False
    return True


def parallelize(model: nn.Module, mesh: ParallelMesh | None, cfg: Any) -> Any:
    """Apply what `cfg` (a TrainConfig) asks for over `mesh` (None: one process); returns what the training step
    calls. The model is changed in place and stays what is evaluated and saved."""
    from deepsail.precision import resolve_precision

    device = next(model.parameters()).device.type
    if mesh is None:
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        return apply_compile(model) if cfg.compile and _compile_pays(device) else model

    from deepsail.parallel.ep import apply_ep, check_ep
    from deepsail.parallel.fsdp import apply_ddp, apply_fsdp
    from deepsail.parallel.tp import apply_tp

    shape = mesh.shape
    precision = resolve_precision(cfg.precision, mesh.device)
    check_ep(model.config, shape.ep)
    if cfg.powersgd_rank and (shape.fsdp or shape.tp > 1):
        raise ValueError(
            f"--powersgd-rank compresses DDP's all-reduce, and this mesh ({shape.describe()}) shards the model; "
            "use it with --dp-replicate N alone, or drop it."
        )
    if precision == "fp16" and (shape.fsdp or shape.tp > 1):
        raise ValueError("--precision fp16 needs a loss scaler that sharded gradients lack; use --precision bf16.")
    if shape.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=True)
    experts = apply_ep(model, mesh["ep"]) if shape.ep > 1 else []
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile and _compile_pays(device):
        compile_blocks(model)
    if shape.fsdp or (shape.dp_replicate > 1 and shape.tp > 1):
        apply_fsdp(model, mesh, precision, experts)
        return model
    if shape.dp_replicate > 1:
        return apply_ddp(model, mesh, cfg.powersgd_rank)
    return model


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for gradients that live on several meshes (dense weights over dp_shard x ep x tp,
    experts over dp_shard x ep, replicated weights as plain tensors): the norm of each mesh's gradients is reduced
    on its own mesh, the squares summed, then `clip_grads_with_norm_` scales them all. Returns the global norm
    before clipping, a plain tensor."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm:
        for group in groups.values():  # one call per group: torch's foreach kernels refuse to mix DTensor meshes
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
