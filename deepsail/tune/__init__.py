"""deepsail.tune: adapting a trained model — LoRA in peft's format, staged fine-tuning, SFT, task heads, EWC."""

from deepsail.tune.lora import (
    AdapterSet,
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

__all__ = [
    "AdapterSet",
    "LoraConfig",
    "apply_lora",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
]
