"""The DeepSeek-style decoder and everything that describes, stores and loads it.

This package imports nothing from the rest of deepsail but its core helpers (`deepsail.files`, `deepsail.precision`):
training, inference and serving build on it, never the other way round (tests/test_layout.py checks).
"""

from deepsail.model.cache import KVCache, KVPool, new_cache
from deepsail.model.config import ModelConfig, config_from_seed
from deepsail.model.hf import config_from_hf, config_to_hf, hf_state_dict, read_config
from deepsail.model.presets import PRESETS
from deepsail.model.transformer import IGNORE_INDEX, ModelOutput, Transformer

from_pretrained = Transformer.from_pretrained

__all__ = [
    "IGNORE_INDEX",
    "KVCache",
    "KVPool",
    "ModelConfig",
    "ModelOutput",
    "PRESETS",
    "Transformer",
    "config_from_hf",
    "config_from_seed",
    "config_to_hf",
    "from_pretrained",
    "hf_state_dict",
    "new_cache",
    "read_config",
]
