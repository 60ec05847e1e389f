"""Inference: sampling, batched generation (beam search, context-aware and MTP-speculative decoding) and the
continuous-batching engine the server runs on."""

from deepsail.infer.engine import Engine, EngineClosed, EngineConfig, QueueFull, RequestHandle
from deepsail.infer.generate import Generation, beam_search, generate, load, stream
from deepsail.infer.sampling import SamplingParams, StreamEvent, sample
from deepsail.infer.speculative import speculative_decode

__all__ = [
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "Generation",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
    "StreamEvent",
    "beam_search",
    "generate",
    "load",
    "sample",
    "speculative_decode",
    "stream",
]
