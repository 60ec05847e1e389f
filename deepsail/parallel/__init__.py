"""Techniques applied to a built model from outside its code, in one fixed order (`parallelize`): tensor and expert
parallelism (tp.py, ep.py), activation checkpointing, torch.compile, FSDP2 or DDP (fsdp.py), over the device mesh
of a torchrun launch (mesh.py); `deepsail plan` sizes a mesh before the hardware exists (plan.py)."""

from deepsail.parallel.mesh import MeshShape, ParallelMesh, close_parallel, init_parallel, mesh_shape
from deepsail.parallel.parallelize import apply_activation_checkpointing, apply_compile, parallelize

__all__ = [
    "MeshShape",
    "ParallelMesh",
    "apply_activation_checkpointing",
    "apply_compile",
    "close_parallel",
    "init_parallel",
    "mesh_shape",
    "parallelize",
]
