"""The DeepSeek-style decoder and everything that describes, stores and loads it."""

from deepsail.model.cache import KVCache, KVPool, new_cache
from deepsail.model.config import ModelConfig, config_from_seed
from deepsail.model.hf import from_pretrained, hf_state_dict, save_pretrained
from deepsail.model.presets import PRESETS
from deepsail.model.transformer import IGNORE_INDEX, ModelOutput, Transformer

__all__ = [
    "IGNORE_INDEX", "KVCache", "KVPool", "ModelConfig", "ModelOutput", "PRESETS", "Transformer", "config_from_seed",
    "from_pretrained", "hf_state_dict", "new_cache", "save_pretrained",
]
