"""`ds.from_pretrained`: whatever deepsail wrote or reads, as one model.

- an HF model folder (DeepSeek-V3/V2, Qwen2, Llama; a deepsail checkpoint or finished run's `model/`);
- the same plus `adapter=DIR`, a LoRA adapter in peft's format, applied unmerged;
- an adapter folder alone: its `base_model_name_or_path` names the base (as peft's AutoPeftModel reads it);
- a fine-tuning checkpoint (`tuned.safetensors` + `base.json`, see `finetune.py`): its base, its adapter, then the
  weights that had trained when it was written (a staged run's top blocks, say);
- a quantized folder (`deepsail quantize`, a QAT run's `RUN/quantized`): config.json's `quantization_config` says
  so, and `compress.load_quantized` builds it. A LoRA adapter on a quantized base is not supported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from deepsail.compress.quantize import load_quantized, quantization_config_of
from deepsail.tune.lora import is_adapter_dir, load_adapter, read_adapter_config

TUNED = "tuned.safetensors"  # a fine-tuning checkpoint's trained weights, deepsail names
BASE_FILE = "base.json"  # {"base": the folder the run started from}


def from_pretrained(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load `path` (any of the forms above), optionally with a peft-format `adapter` applied (unmerged)."""
    from deepsail.model import Transformer

    path = Path(path)
    tuned = None
    if (path / TUNED).is_file() and (path / BASE_FILE).is_file():
        if adapter is not None:
            raise ValueError(
                f"{path} is a fine-tuning checkpoint: it brings its own adapter; load it without adapter=."
            )
        tuned = path
        base = Path(_read_base(path))
        adapter = path if is_adapter_dir(path) else None
        path = base
    elif adapter is None and is_adapter_dir(path) and not (path / "config.json").is_file():
        _, raw = read_adapter_config(path)
        base = raw.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(
                f"{path} is a LoRA adapter whose base_model_name_or_path ({base!r}) is not a folder here; load it "
                f"with from_pretrained(BASE, adapter={str(path)!r})."
            )
        path, adapter = Path(base), path
    qc = quantization_config_of(path)
    if qc is not None and adapter is not None:
        raise ValueError(
            f"{path} is quantized ({qc['method']}); LoRA adapters apply to float bases only: load the adapter with "
            "the float model it was trained on (and quantize the merged model, if a quantized one is the goal)."
        )
    if qc is not None:
        model = load_quantized(path, dtype=dtype, device=device)
    else:
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    model.name_or_path = str(path.resolve())
    if adapter is not None:
        load_adapter(model, adapter)
    if tuned is not None:
        load_tuned(model, tuned, prefix="trunk.")  # a classifier run's trunk weights load into the bare model
    return model.to(device).eval()


def _read_base(checkpoint: Path) -> str:
    try:
        base = json.loads((checkpoint / BASE_FILE).read_text())["base"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{checkpoint / BASE_FILE} is unreadable ({e}); it should name the run's base model.") from e
    if not Path(base).is_dir():
        raise ValueError(f"{checkpoint} was fine-tuned from {base}, which is not a folder here any more.")
    return base


def load_tuned(model: nn.Module, checkpoint: Path, prefix: str = "") -> None:
    """Copy a checkpoint's trained weights into `model` (a task model's trunk takes them without `prefix`)."""
    tensors = load_file(str(checkpoint / TUNED))
    state = model.state_dict()
    picked = {k.removeprefix(prefix): v for k, v in tensors.items() if k.removeprefix(prefix) in state}
    foreign = sorted(k for k in tensors if k.removeprefix(prefix) not in state and not k.startswith("score."))
    if foreign:
        raise ValueError(f"{checkpoint / TUNED} holds tensors this model lacks: {foreign[:5]} (another base?)")
    wrong = [
        f"{k}: saved {tuple(v.shape)}, model {tuple(state[k].shape)}"
        for k, v in picked.items()
        if v.shape != state[k].shape
    ]
    if wrong:
        raise ValueError(f"{checkpoint / TUNED} does not fit this model (other LoRA rank or targets?): {wrong[:4]}")
    with torch.no_grad():
        for k, v in picked.items():
            state[k].copy_(v)
