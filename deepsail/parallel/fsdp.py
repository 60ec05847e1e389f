"""Data parallelism: FSDP2 (`fully_shard`, ZeRO-3) per block, or plain DDP with optional PowerSGD compression.

FSDP2 shards every parameter on dim 0 over the data-parallel ranks and all-gathers a block's weights just before
it runs (and again in backward), then frees them: per rank, weights, gradients and AdamW state cost 1/N of the
model. Each decoder block (and each MTP module's block) is its own unit, so one block's gather overlaps the previous
block's compute; the root unit holds the embedding, final norm and head.

Dense weights shard over dp_shard x ep (the ep ranks read different data, so for a dense weight they are just more
data-parallel ranks); routed experts, already split over ep, shard over dp_shard alone. With dp_replicate > 1
both become HSDP (sharded within a group, all-reduced across groups).

Mixed precision is FSDP2's `MixedPrecisionPolicy`: parameters gathered in bf16 for the forward and backward,
gradients reduced in fp32, the sharded master weights and AdamW moments fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from deepsail.parallel.mesh import ParallelMesh
from deepsail.precision import DTYPES


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 (or fp16) compute with fp32 gradient reduction; fp32 keeps everything fp32."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, pm: ParallelMesh, precision: str, experts: list[nn.Module]) -> None:
    """fully_shard the experts, each block, each MTP module, then the root, in place."""
    shape = pm.shape
    replicate = shape.dp_replicate > 1
    dense_mesh = pm["dp_replicate,dp_shard_ep"] if replicate else pm["dp_shard_ep"]
    expert_mesh = pm["dp_replicate,dp_shard"] if replicate else pm["dp_shard"]
    mp = mixed_precision(precision)
    for ex in experts:
        fully_shard(ex, mesh=expert_mesh, mp_policy=mp)
        # FSDP2 averages over its own mesh (dp_replicate x dp_shard); an expert's gradient already sums the tokens
        # of all ep ranks, so the average must run over the full data-parallel degree.
        ex.set_gradient_divide_factor(float(shape.dp))
        if pm.device.type != "cuda" and expert_mesh.size() > 1:
            # NCCL scales inside the reduce (PREMUL_SUM), gloo cannot: sum, then FSDP divides. Not on a 1-rank
            # mesh: there torch 2.13 divides by the factor twice (the experts' gradients came out halved).
            ex.set_force_sum_reduction_for_comms(True)
    # An MTP module's block is its unit; its norms and projection join the root: the model calls `mtp.norm` after
    # the module's forward, when a unit of its own would already have freed (resharded) them.
    for block in [*model.layers, *(m.block for m in getattr(model, "mtp", ()))]:
        fully_shard(block, mesh=dense_mesh, mp_policy=mp)
    # The root keeps its weights (embedding, norm, head) gathered after forward: backward needs them first.
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False)


def apply_ddp(model: nn.Module, pm: ParallelMesh, powersgd_rank: int) -> nn.Module:
    """DistributedDataParallel over all ranks; with `powersgd_rank` > 0, gradients are sent as PowerSGD's rank-r
    factors (Vogels et al. 2019): a [m, n] gradient costs (m + n)·r floats instead of m·n, with error feedback so
    what compression drops is added back next step. Returns the wrapper the training step calls."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [pm.device.index] if pm.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=pm["dp"].get_group())
    if powersgd_rank:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        # start_powerSGD_iter: the first steps' exact all-reduce, as the paper warms up before compressing.
        state = powersgd.PowerSGDState(
            process_group=pm["dp"].get_group(),
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=2,
            min_compression_rate=2,
        )
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    return ddp
