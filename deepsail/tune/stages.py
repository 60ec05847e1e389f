"""Staged fine-tuning: which parameters train in each stage, read from the design's own `stages.json`.

    {"base_tuning":   {"layers": [-3, -2, -1], "lr": 3e-5, "epochs": 3},
     "domain_tuning": {"layers": "all",        "lr": 1e-5, "epochs": 6}}

Stages run in file order, each a run of the one training loop with its own learning rate and length, starting
from the weights the previous stage ended with. `layers` is "all", or a list whose items are block indices
(negative counts from the top: -1 is the last block) and the names "lora" (every LoRA A/B), "head" (the output
head and the final norm; a classifier's score layer), "embeddings" (the token embedding); a single name may stand
alone. Everything not selected is frozen, and a frozen parameter stays bitwise unchanged (tests/test_finetune.py).
With tied embeddings, "head" and "embeddings" are the same matrix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from deepsail.tune.lora import is_lora_param

NAMED = ("all", "lora", "head", "embeddings")
STAGE_KEYS = {"layers", "lr", "epochs", "steps"}


@dataclass(frozen=True)
class Stage:
    name: str
    layers: tuple[int | str, ...]  # block indices and/or names from NAMED
    lr: float
    epochs: float | None = None
    steps: int | None = None


def parse_layers(value: Any, where: str) -> tuple[int | str, ...]:
    items = [value] if isinstance(value, str | int) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f'{where}: `layers` must be "all", a name from {list(NAMED)}, or a non-empty list.')
    out: list[int | str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str) or (isinstance(item, str) and item not in NAMED):
            raise ValueError(f"{where}: layer {item!r} is neither a block index nor one of {list(NAMED)}.")
        out.append(item)
    return tuple(out)


def read_stages(path: str | Path) -> list[Stage]:
    """The stages of a stages.json, validated (unknown keys, bad values and empty files are errors naming them)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"--stages {path}: no such file.") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"--stages {path} is not readable JSON ({e}).") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f'{path}: expected an object of stages, e.g. {{"base_tuning": {{"layers": [-1], ...}}}}.')
    stages = []
    for name, spec in raw.items():
        where = f"{path}: stage {name!r}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be an object with keys {sorted(STAGE_KEYS)}.")
        unknown = sorted(set(spec) - STAGE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a stage takes {sorted(STAGE_KEYS)}.")
        if "layers" not in spec or "lr" not in spec:
            raise ValueError(f"{where} needs `layers` and `lr`.")
        lr = spec["lr"]
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{where}: lr must be a number > 0, got {lr!r}.")
        epochs, steps = spec.get("epochs"), spec.get("steps")
        if epochs is None and steps is None:
            raise ValueError(f"{where} needs `epochs` or `steps`.")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int | float) or epochs <= 0):
            raise ValueError(f"{where}: epochs must be a number > 0, got {epochs!r}.")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}.")
        stages.append(Stage(str(name), parse_layers(spec["layers"], where), float(lr), epochs, steps))
    return stages


def select_trainable(
    model: nn.Module, layers: tuple[int | str, ...], where: str = "stage", train_mtp: bool = True
) -> int:
    """Freeze everything, then unfreeze what `layers` names; returns the number of trainable parameters.
    `train_mtp=False` keeps the MTP modules frozen even under "all".

    `model` is a deepsail Transformer, or a task model whose `trunk` is one (a classifier's `score` counts as head).
    """
    trunk = getattr(model, "trunk", model)
    n_blocks = len(trunk.layers)
    selected: list[nn.Parameter] = []
    params = dict(model.named_parameters())
    prefix = "trunk." if trunk is not model else ""
    for item in layers:
        if item == "all":
            selected += list(params.values())
        elif item == "lora":
            chosen = [p for n, p in params.items() if is_lora_param(n)]
            if not chosen:
                raise ValueError(f'{where}: layers names "lora" but the model has no LoRA adapter; pass --lora-r.')
            selected += chosen
        elif item == "head":  # by identity: a tied head's only name is embed_tokens.weight
            selected += [trunk.lm_head.weight, *trunk.norm.parameters()]
            selected += [p for n, p in params.items() if n.startswith("score.")]
        elif item == "embeddings":
            selected += [p for n, p in params.items() if n.startswith(f"{prefix}embed_tokens.")]
        else:
            if not -n_blocks <= item < n_blocks:
                raise ValueError(
                    f"{where}: layer {item} is out of range: the model has {n_blocks} blocks (0..{n_blocks - 1}, "
                    f"or -{n_blocks}..-1 from the top)."
                )
            block = f"{prefix}layers.{item % n_blocks}."
            selected += [p for n, p in params.items() if n.startswith(block)]
    model.requires_grad_(False)
    for p in selected:
        p.requires_grad_(True)
    if not train_mtp and hasattr(trunk, "mtp"):
        trunk.mtp.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
