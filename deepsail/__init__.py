"""deepsail: a PyTorch toolkit for DeepSeek-style language models.

import deepsail as ds
model = ds.Transformer(layers=12, heads=16)       # a DeepSeek-V3-shaped model from a few numbers
model = ds.from_pretrained("path/to/hf-dir")      # DeepSeek-V3/V2, Qwen2, Llama checkpoints
model = ds.from_pretrained("base", adapter="adapters/finance")  # + a LoRA adapter in peft's format
model.save_adapter("adapters/finance")            # after deepsail.tune.apply_lora
compiled = ds.compile(model, input_shape=(128, 512), optimize_for="inference")  # torch.compile'd forward
compiled.save("optimized_model.ds")               # a torch.export program; ds.load(path) runs it without deepsail
"""

from deepsail.export.pt2 import compile, load
from deepsail.model import KVCache, ModelConfig, ModelOutput, Transformer
from deepsail.tune.load import from_pretrained

__version__ = "0.1.0"
__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "compile",
    "from_pretrained",
    "load",
    "__version__",
]
