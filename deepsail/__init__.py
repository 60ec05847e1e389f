"""deepsail: a PyTorch toolkit for DeepSeek-style language models.

import deepsail as ds
model = ds.Transformer(layers=12, heads=16)       # DeepSeek-V3-shaped from a few numbers: 329M params, 190M active
model = ds.from_pretrained("path/to/hf-dir")      # DeepSeek-V3/V2, Qwen2, Llama checkpoints
model = ds.from_pretrained("base", adapter="adapters/finance")  # + a LoRA adapter in peft's format
model.save_adapter("adapters/finance")            # after deepsail.tune.apply_lora
optimizer = ds.Adam(model.parameters(), lr=1e-3)  # the trainer's AdamW (fused); ds.Adam(model, ...) for its groups
loss = ds.CrossEntropyLoss(outputs, targets)      # outputs = model(inputs); targets aligned with them (no shift)
compiled = ds.compile(model, input_shape=(128, 512), optimize_for="inference")  # torch.compile'd forward
compiled.save("optimized_model.ds")               # a torch.export program; ds.load(path) runs it without deepsail

The seed document's training loop runs as written (tests/test_seed_api.py):

for epoch in range(n):
    for inputs, targets in dataloader:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = ds.CrossEntropyLoss(outputs, targets)
        loss.backward()
        optimizer.step()

These names are doors into the machinery `deepsail pretrain` uses (train/optim.py, model/loss.py, export/pt2.py),
not a second implementation of it.
"""

from typing import Any

from deepsail.export.pt2 import compile, load
from deepsail.model import KVCache, ModelConfig, ModelOutput, Transformer
from deepsail.model.loss import CrossEntropyLoss
from deepsail.tune.load import from_pretrained

__version__ = "0.1.0"
__all__ = [
    "Adam",
    "CrossEntropyLoss",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "compile",
    "from_pretrained",
    "load",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # ds.Adam lives with the trainer (deepsail.train), whose package brings the loop, rich and the checkpoint code:
    # ~0.2 s more per `import deepsail`, so it loads on first use instead.
    if name == "Adam":
        from deepsail.train.optim import Adam

        return Adam
    raise AttributeError(f"module 'deepsail' has no attribute {name!r}")
