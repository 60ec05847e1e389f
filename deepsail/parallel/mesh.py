"""The device mesh of a torchrun launch: which rank holds which slice of the data, the weights and the experts.

deepsail never starts processes: `torchrun` does, and sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR for the
rendezvous). Each process then calls `init_parallel`, which joins the process group (NCCL on GPUs, gloo on CPUs)
and lays the world out as one 4-D `DeviceMesh`, outermost first:

    dp_replicate   plain data parallel (DDP, or the replicate half of HSDP): whole copies of the model
    dp_shard       FSDP2 (ZeRO-3): parameters, gradients and optimizer state sharded, gathered per block
    ep             expert parallel: each rank owns n_routed_experts / ep of every MoE layer's experts;
                   for everything else it is one more FSDP dimension (dense weights shard over dp_shard x ep)
    tp             tensor parallel: attention heads and MLP columns split, innermost so that its per-layer
                   collectives stay on the fastest links (NVLink within a node)

Every rank of one (dp_replicate, dp_shard, ep) coordinate reads the same batch, so the data-parallel degree is
dp_replicate * dp_shard * ep and `--batch-size` is per data-parallel rank: the global batch is batch_size * that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("dp_replicate", "dp_shard", "ep", "tp")


@dataclass(frozen=True)
class MeshShape:
    """How many ranks along each mesh dimension; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches one step sees."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def fsdp(self) -> bool:
        """Whether weights are sharded (FSDP2): asked for, or needed to hold experts sharded over ep."""
        return self.dp_shard > 1 or self.ep > 1

    def describe(self) -> str:
        return " x ".join(f"{name} {getattr(self, name)}" for name in DIMS if getattr(self, name) > 1) or "1 process"


def mesh_shape(world: int, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, tp: int = 1) -> MeshShape:
    """The mesh the flags name for `world` processes; dp_shard -1 takes whatever the other dimensions leave.

    Raises ValueError when the product is not the world size, saying which launch would fit."""
    for name, value in (("dp_replicate", dp_replicate), ("ep", ep), ("tp", tp)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if dp_shard == 0 or dp_shard < -1:
        raise ValueError(f"--dp-shard must be >= 1 (or -1: the ranks the other dimensions leave), got {dp_shard}.")
    others = dp_replicate * ep * tp
    if dp_shard == -1:
        if world % others:
            raise ValueError(
                f"the mesh --dp-replicate {dp_replicate} x --ep {ep} x --tp {tp} needs a multiple of {others} ranks, "
                f"but this launch has {world}; run `torchrun --nproc_per_node {others} -m deepsail pretrain ...` "
                "(or a multiple of it) or change the flags."
            )
        dp_shard = world // others
    shape = MeshShape(dp_replicate, dp_shard, ep, tp)
    if shape.world != world:
        launch = "one process (no torchrun)" if world == 1 else f"{world} processes"
        raise ValueError(
            f"the mesh --dp-replicate {dp_replicate} x --dp-shard {dp_shard} x --ep {ep} x --tp {tp} = {shape.world} "
            f"ranks, but this launch has {launch}; run `torchrun --nproc_per_node {shape.world} -m deepsail "
            "pretrain ...` or change the flags so their product is the world size."
        )
    return shape


@dataclass
class ParallelMesh:
    """A launch's mesh and where this process sits in it."""

    shape: MeshShape
    mesh: DeviceMesh  # the 4-D mesh, dims named as DIMS
    device: torch.device
    flat: dict[str, DeviceMesh]  # the flattened views, kept here (torch deprecates slicing them from the root)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __getitem__(self, name: str) -> DeviceMesh:
        """A sub-mesh: one of DIMS, or the flattened `dp` (data), `dp_shard_ep` (FSDP of dense weights),
        and for HSDP `dp_replicate,dp_shard_ep` / `dp_replicate,dp_shard` (2-D)."""
        if name in self.flat:
            return self.flat[name]
        return self.mesh[tuple(name.split(","))] if "," in name else self.mesh[name]

    @property
    def dp_rank(self) -> int:
        """Which slice of each global batch this rank reads."""
        return self.flat["dp"].get_local_rank()

    def barrier(self) -> None:
        dist.barrier()


def build_mesh(shape: MeshShape, device: torch.device) -> ParallelMesh:
    """The 4-D mesh over the already initialised process group, with the flattened views the techniques use."""
    mesh = init_device_mesh(device.type, tuple(getattr(shape, d) for d in DIMS), mesh_dim_names=DIMS)
    # Flattened views: DeviceMesh has no public spelling of these yet; torchtitan uses _flatten the same way.
    flat = {
        "dp": mesh["dp_replicate", "dp_shard", "ep"]._flatten("dp"),
        "dp_shard_ep": mesh["dp_shard", "ep"]._flatten("dp_shard_ep"),
    }
    return ParallelMesh(shape, mesh, device, flat)


def launched_world() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(cfg: Any, device: torch.device) -> ParallelMesh | None:
    """Join torchrun's process group and build the mesh `cfg` (a TrainConfig) names; None for a one-process run.

    NCCL on CUDA (each process on the GPU of its LOCAL_RANK), gloo on CPU. A mesh that asks for more than one rank
    without torchrun is refused with the launch that would fit."""
    world = launched_world()
    shape = mesh_shape(world, cfg.dp_replicate, cfg.dp_shard, cfg.ep, cfg.tp)
    if world == 1:
        return None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=_device_id(device))
    return build_mesh(shape, device)


def _device_id(device: torch.device) -> torch.device | None:
    # Binding the process group to its GPU lets NCCL connect eagerly; gloo takes no device.
    return device if device.type == "cuda" else None


def close_parallel(pm: ParallelMesh | None) -> None:
    """Leave the process group at the end of a run (torchrun waits for every rank to exit)."""
    if pm is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
