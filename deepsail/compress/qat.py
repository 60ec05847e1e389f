"""Quantization-aware training, from outside the model: every layer `quantize` would convert computes with its
weights fake-quantized (quantized, then dequantized, by the converter's own math: `quantize.fake_quantize`), and
the gradient passes straight through the rounding to the float weights (the straight-through estimator,
Bengio et al. 2013): w_q = w + (fake_quantize(w) - w).detach().

    apply_qat(model, QuantConfig(method="int4", group_size=64))   # in place; parameter names unchanged
    ...train...                                                    # checkpoints and save_pretrained: float weights
    convert_qat(model)                                             # the quantized model: what training computed

The float weights keep their names (a QAT layer holds the layer's own `weight`/`bias`, as LoRA's do), so the
training loop's checkpoints, resume and `save_pretrained` are those of any run. `convert_qat` then quantizes the
trained weights with the same math, so the converted model applies exactly the weights training saw; its logits
differ from the fake-quantized model's only by the kernels' rounding (bf16 activations, tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsail.compress.quantize import (
    QuantConfig,
    _candidates,
    _check_widths,
    _replace,
    _tied_head,
    fake_quantize,
    name_matches,
    quant_layers,
    quantize,
)
from deepsail.model.layers import Linear, linear
from deepsail.model.moe import Experts

QAT_METHODS = ("int8", "int4")  # weight quantization; int8-dynamic's activations are not simulated


def ste(w: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    """fake_quantize(w) forward, identity backward."""
    return w + (fake_quantize(w, method, group_size).to(w.dtype) - w).detach()


class FakeQuantLinear(nn.Module):
    """A linear layer training through its weights' quantization. `weight`/`bias` are the base layer's own."""

    def __init__(self, base: nn.Linear, method: str, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.method, self.group_size = method, group_size

    def effective_weight(self) -> torch.Tensor:
        return ste(self.weight, self.method, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fake {self.method}"


class FakeQuantExperts(nn.Module):
    """The routed experts, training through their stacked weights' quantization (the experts' usual kernel)."""

    def __init__(self, base: Experts, method: str, group_size: int) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.method, self.group_size = method, group_size

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        m, g = self.method, self.group_size
        return Experts.run(x_sorted, counts, ste(self.gate_up_proj, m, g), ste(self.down_proj, m, g))


FAKE_LAYERS = (FakeQuantLinear, FakeQuantExperts)


def fake_layers(model: nn.Module) -> dict[str, FakeQuantLinear | FakeQuantExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FAKE_LAYERS)}


def apply_qat(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Fake-quantize, in place, every layer `quantize(model, cfg)` would convert. Returns the model."""
    if cfg.method not in QAT_METHODS:
        raise ValueError(f"--qat {cfg.method!r}: quantization-aware training simulates {' or '.join(QAT_METHODS)}.")
    if fake_layers(model) or quant_layers(model):
        raise ValueError("this model is already fake-quantized or quantized; apply QAT to a float model.")
    targets = {
        n: m
        for n, m in _candidates(model).items()
        if not name_matches(cfg.skip, n) and not _tied_head(model, n) and not isinstance(m, FAKE_LAYERS)
    }
    _check_widths(model, targets, cfg)
    for name, m in targets.items():
        cls = FakeQuantExperts if isinstance(m, Experts) else FakeQuantLinear
        _replace(model, name, cls(m, cfg.method, cfg.group_size))
    model.qat_config = cfg
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Back to plain float layers holding the same (trained) parameters."""
    for name, m in fake_layers(model).items():
        with torch.device("meta"):  # shells: the parameters are the QAT layer's own
            if isinstance(m, FakeQuantExperts):
                E, _, dim = m.gate_up_proj.shape
                plain: nn.Module = Experts(E, dim, m.down_proj.shape[2])
            else:
                plain = Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, FakeQuantExperts):
            plain.gate_up_proj, plain.down_proj = m.gate_up_proj, m.down_proj
        else:
            plain.weight, plain.bias = m.weight, m.bias
        _replace(model, name, plain)
    model.__dict__.pop("qat_config", None)
    return model


@torch.no_grad()
def convert_qat(model: nn.Module, **_: Any) -> nn.Module:
    """The trained QAT model as a quantized one (in place): the float layers back, then `quantize` with the same
    config, which applies exactly the weights the fake quantization computed."""
    cfg = getattr(model, "qat_config", None)
    if cfg is None:
        raise ValueError("this model has no QAT layers: apply_qat(model, cfg) and train it first.")
    remove_qat(model)
    return quantize(model, cfg)
