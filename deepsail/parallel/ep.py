"""Expert parallelism: each rank of the `ep` mesh dimension owns n_routed_experts / ep experts of every MoE layer,
and tokens travel to their experts and back by all-to-all.

The MoE layer (`model/moe.py`) already sorts its (token, expert) pairs by expert before calling its `Experts`, so
the rows bound for rank r are one contiguous slice: the experts r·E/ep ... (r+1)·E/ep - 1. This file swaps the
`Experts` module for `ExpertParallelExperts`, whose forward takes the same (sorted rows, counts per expert):

    1. all-to-all the counts: how many rows each rank sends for each of my experts   (E ints per rank)
    2. all-to-all the rows (autograd: the backward sends the gradients back the same way)
    3. regroup the received rows by local expert, run them as one grouped GEMM over my experts' weights
    4. undo the regrouping, all-to-all the results home, in the order the MoE layer sent them

Routing, gate weights, the shared experts and the combine are the MoE layer's own code, unchanged. The weights are
DTensors sharded on the expert dimension (Shard(0) on the ep mesh), so FSDP2 and distributed checkpoints see the
global [E, ...] tensors and reshard them to any other layout.

An expert's gradient sums the tokens of all ep ranks, while every other weight's gradient is one rank's; FSDP2
therefore divides the experts' gradients by the whole data-parallel degree, not by its own mesh's size
(`fsdp.py`). The balancing bias needs every rank's load: the trainer all-reduces the tokens per expert before
the bias update (`reduce_expert_load`), so all ranks move their router biases identically.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from deepsail.model.moe import Experts, MoE


def _regroup(counts_RE: torch.Tensor) -> torch.Tensor:
    """Rows arrive ordered by (source rank, expert); the index that orders them by (expert, source rank)."""
    sizes = counts_RE.flatten()
    starts_RE = (sizes.cumsum(0) - sizes).view_as(counts_RE)
    sizes_ER, starts_ER = counts_RE.t().flatten(), starts_RE.t().flatten()
    target_starts = sizes_ER.cumsum(0) - sizes_ER
    total = int(sizes.sum())
    return torch.repeat_interleave(starts_ER - target_starts, sizes_ER, output_size=total) + torch.arange(
        total, device=counts_RE.device
    )


class ExpertParallelExperts(Experts):
    """`Experts` whose weights hold only this rank's experts (as the local shard of a DTensor over the ep mesh)."""

    ep_group: dist.ProcessGroup
    ep_size: int

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n = self.ep_size
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if isinstance(w_gate_up, DTensor):
            w_gate_up, w_down = w_gate_up.to_local(), w_down.to_local()
        e_local = w_gate_up.shape[0]
        send_RE = counts.view(n, e_local)
        recv_RE = torch.empty_like(send_RE)
        dist.all_to_all_single(recv_RE, send_RE, group=self.ep_group)
        # One host sync per layer: the split sizes of the row all-to-all must be known on the host.
        send_splits, recv_splits = send_RE.sum(1).tolist(), recv_RE.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.ep_group)
        order = _regroup(recv_RE)
        y = Experts.run(x_recv.index_select(0, order), recv_RE.sum(0), w_gate_up, w_down)
        y = y.index_select(0, torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=y.device)))
        return all_to_all_single_autograd(y, send_splits, recv_splits, self.ep_group)


def check_ep(config: object, ep: int) -> None:
    if ep > 1 and not config.n_routed_experts:
        raise ValueError(f"--ep {ep} shards routed experts, and this model is dense; use --dp-shard or --tp instead.")
    if config.n_routed_experts % ep:
        raise ValueError(
            f"--ep {ep} must divide the model's n_routed_experts ({config.n_routed_experts}); choose a divisor."
        )


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Shard every MoE layer's routed experts over `ep_mesh` in place; returns the expert modules."""
    check_ep(model.config, ep_mesh.size())
    experts = []
    for module in model.modules():
        if isinstance(module, MoE):
            ex = module.experts
            for name, p in list(ex.named_parameters(recurse=False)):
                shard = distribute_tensor(p.data, ep_mesh, [Shard(0)])
                ex.register_parameter(name, nn.Parameter(shard, requires_grad=p.requires_grad))
            ex.__class__ = ExpertParallelExperts
            ex.ep_group, ex.ep_size = ep_mesh.get_group(), ep_mesh.size()
            experts.append(ex)
    return experts


def reduce_expert_load(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every MoE layer's tokens-per-expert over the ranks (one all-reduce for all layers), so the balancing
    bias update (`Transformer.update_balance_bias`) and the logged load see the whole global batch."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.tokens_per_expert is not None]
    if not layers:
        return
    flat = torch.cat([m.tokens_per_expert.float() for m in layers])
    dist.all_reduce(flat, group=group)
    for m, load in zip(layers, flat.split([m.n_experts for m in layers])):
        m.tokens_per_expert = load
