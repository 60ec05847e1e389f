"""Techniques applied to a built model from outside its code: activation checkpointing, torch.compile (and, as
they land, tensor/expert parallelism and FSDP), in one fixed order (`parallelize`)."""

from deepsail.parallel.parallelize import apply_activation_checkpointing, apply_compile, parallelize

__all__ = ["apply_activation_checkpointing", "apply_compile", "parallelize"]
