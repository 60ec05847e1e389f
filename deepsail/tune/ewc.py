"""Elastic weight consolidation (Kirkpatrick et al., 2017): learn task B without forgetting task A.

After training on task A, the diagonal of the Fisher information F_i = E[(d log p / d theta_i)^2] over A's data
says how much each weight mattered to A. Training on B then adds (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,
with theta* the weights A ended with: weights A relied on are held in place, the rest are free to move.

Every fine-tuning run saves F for the weights it trained, beside its merged model (`RUN/model/fisher.safetensors`,
estimated from `--ewc-batches` batches of its own training data, the empirical Fisher of its loss). A later run on
that model with `--ewc-lambda` finds it there: the anchor theta* is the model it starts from. A LoRA run on B is
penalised through its effective weights: the update s·BA of each adapted layer is theta - theta*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FISHER_FILE = "fisher.safetensors"


def fisher_diagonal(
    model: nn.Module,
    batches: Iterator[Any],
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    n_batches: int,
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the loss, per parameter, over `n_batches` batches (the empirical Fisher).

    `names` (default: the parameters that require grad) are the base weights to estimate it for; for a LoRA layer
    the base weight's gradient is taken with the adapter folded into the forward as it is."""
    params = dict(model.named_parameters())
    names = names if names is not None else {n for n, p in params.items() if p.requires_grad}
    if not names:
        raise ValueError("no parameters to estimate the Fisher information for.")
    saved = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    for n, p in params.items():
        p.requires_grad_(n in names)
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    try:
        for _ in range(n_batches):
            model.zero_grad(set_to_none=True)
            loss_fn(model, next(batches))["loss"].backward()
            for n in names:
                if params[n].grad is not None:
                    fisher[n] += params[n].grad.float() ** 2 / n_batches
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return fisher


def save_fisher(fisher: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Into `folder` (a model folder being written; atomicity is the caller's)."""
    path = Path(folder) / FISHER_FILE
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path), metadata={"kind": "ewc-fisher-diagonal"})
    return path


def load_fisher(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / FISHER_FILE
    if not path.is_file():
        raise ValueError(
            f"--ewc-lambda needs the Fisher information of the previous task, {path}, which is missing: fine-tune the "
            "previous task with --ewc-batches > 0 (its RUN/model folder then holds it), and start from that folder."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e


class EWCPenalty:
    """(lambda / 2) * sum F (theta - theta*)^2 over the weights that have a Fisher entry and can move in this run."""

    def __init__(
        self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float, trainable: set[str] | None = None
    ) -> None:
        """Build it before training starts: the anchor theta* is the model's weights now. `trainable`: the names
        that will train in this run (default: those that require grad now)."""
        from deepsail.tune.lora import LoraExperts, LoraLinear, lora_layers

        if not lam > 0:
            raise ValueError(f"--ewc-lambda must be > 0, got {lam}.")
        self.lam = lam
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        self.direct: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, anchor, F)
        self.adapted: list[tuple[Any, str, torch.Tensor]] = []  # (LoRA layer, which weight, F)
        lora = {f"{name}.weight": m for name, m in lora_layers(model).items() if isinstance(m, LoraLinear)}
        experts = {name: m for name, m in lora_layers(model).items() if isinstance(m, LoraExperts)}
        for name, F in fisher.items():
            F = F.to(device)
            if name in lora:
                self.adapted.append((lora[name], "weight", F))
            elif name.rsplit(".", 1)[0] in experts:
                self.adapted.append((experts[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1], F))
            elif name in params and (name in trainable if trainable is not None else params[name].requires_grad):
                self.direct.append((params[name], params[name].detach().clone(), F))
        if not self.direct and not self.adapted:
            raise ValueError(
                "--ewc-lambda: none of the weights this run trains has a Fisher entry from the previous task; train "
                "the same layers (or LoRA on the layers the previous run trained)."
            )

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), device=self.direct[0][0].device if self.direct else None)
        for p, anchor, F in self.direct:
            total = total + (F * (p.float() - anchor.float()) ** 2).sum()
        for layer, which, F in self.adapted:
            if which == "weight":
                delta = layer.delta()
            else:
                delta = layer.deltas()[0 if which == "gate_up_proj" else 1]
            total = total + (F * delta**2).sum()
        return 0.5 * self.lam * total
