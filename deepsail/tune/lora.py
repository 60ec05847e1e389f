"""LoRA (Hu et al., 2021), applied to a deepsail model from outside, and PEFT's adapter format both ways.

    model = ds.from_pretrained("runs/base/checkpoints/latest")
    apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.1))   # the design's recommended adapter
    ...train...
    model.save_adapter("adapters/finance")                      # adapter_config.json + adapter_model.safetensors
    ds.from_pretrained("runs/base/checkpoints/latest", adapter="adapters/finance")

A target layer y = W x + b becomes y = W x + b + s · B A dropout(x), with A [r, in] (Kaiming-uniform, as peft) and
B [out, r] (zeros, so training starts from the base model), s = alpha / r (rsLoRA: alpha / sqrt(r)). The base
weight is frozen and keeps its name and its dtype (bf16 or fp32); A and B are fp32 master weights whatever the base,
so a bf16 base does not round every small update away.

Targets are chosen by name exactly as peft chooses them, on the HF module name (`model.layers.3.self_attn.q_a_proj`):
a list of names matches a module whose name is one of them or ends with "." + one of them; a single string is a
regular expression the whole name must match. The default adapts every projection of MLA/GQA attention, the dense
MLPs and the shared experts; `experts=True` adds the routed experts' stacked weights (peft's `target_parameters`
layout: one A/B pair per expert, the gate|up fused weight at rank 2r and alpha 2·alpha, as peft does). The MTP
modules and the output head are never adapted.

PEFT's on-disk format is this module's business alone (the one PEFT seam): `adapter_config.json` with peft's keys,
and `adapter_model.safetensors` with tensors named `base_model.model.<HF module>.lora_A.weight` ([r, in]) and
`.lora_B.weight` ([out, r]); routed experts: `...mlp.experts.base_layer.lora_A.weight` ([E·2r, D], gate|up) and
`...mlp.experts.lora_A.weight` ([E·r, H], down), B as [out, r·E]. `peft.PeftModel.from_pretrained` loads what
`save_adapter` writes onto transformers' model of the same base, and `load_adapter` reads what peft saves
(tests/test_lora.py checks both against peft's logits).

Serving several adapters on one base (`AdapterSet`): every adapted layer keeps each adapter's frozen A and s·B, and
each batch row names its adapter; a layer adds, for each adapter present in the batch, its low-rank product over
that adapter's rows (a loop over adapters, never over tokens or rows). Nothing is merged, so base and adapter rows
share one continuous batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deepsail.files import atomic_dir
from deepsail.model.hf import hf_to_native, native_to_hf
from deepsail.model.layers import linear
from deepsail.model.moe import Experts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Every projection deepsail's attention and MLPs have (MLA's five, GQA's four, SwiGLU's three). Absent ones don't match.
DEFAULT_TARGETS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass
class LoraConfig:
    """An adapter's shape. The defaults are the design's recommendation: r=16, alpha=32, dropout 0.1."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] | str = DEFAULT_TARGETS  # module names (suffix match) or one regex (full match)
    rslora: bool = False  # scale by alpha/sqrt(r) (Kalajdzievski 2023): the update's size stops shrinking with r
    experts: bool = False  # also adapt the routed experts' stacked weights (no dropout there, as in peft)

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ValueError("LoRA targets are empty: name at least one module (e.g. q_a_proj) or give a regex.")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"LoRA targets {self.targets!r} is not a valid regular expression: {e}") from e

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, alpha or self.alpha
        return alpha / (math.sqrt(r) if self.rslora else r)


def matches(targets: tuple[str, ...] | str, name: str) -> bool:
    """peft's rule: a regex must match the whole name; a list entry matches the name or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# --- the adapted layers ----------------------------------------------------------------------------------------------
def lora_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout on the LoRA branch's input. On CPU the keep mask comes from 16-bit random integers (four
    per int64 draw) instead of bernoulli_: a [1024, 512] forward + backward takes 2.7 ms instead of F.dropout's
    6.4 ms (measured on Zen 4), and mask drawing was ~10-20% of a LoRA step. p is rounded to 1/65536 (0.1 ->
    0.100006), the output scaled by the exact keep rate; the draw follows torch's seeded generator."""
    threshold = round(p * 65536) - 32768
    if x.device.type != "cpu" or threshold >= 32767:
        return F.dropout(x, p, True)
    scale = 65536 / (32768 - threshold)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    keep = words.view(torch.int16)[:n].view(x.shape) >= threshold
    return torch.where(keep, x * scale, 0.0)


class LoraLinear(nn.Module):
    """A linear layer plus one trainable low-rank update. `weight`/`bias` are the base layer's own parameters (same
    names in the state dict, so a base checkpoint still loads); `lora_A`/`lora_B` are new, fp32."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init (that of nn.Linear)
        self.r, self.scaling, self.dropout = r, scaling, dropout
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = x
        if self.dropout and self.training:
            if torch.is_autocast_enabled(x.device.type):  # the matmul below reads bf16 anyway: drop half the bytes
                h = h.to(torch.get_autocast_dtype(x.device.type))
            h = lora_dropout(h, self.dropout)
        # F.linear (not a matmul by hand) so autocast casts A and B like every other projection; the scaling goes
        # into B ([out, r]) rather than over the [tokens, out] output, a pass less forward and backward.
        return y + F.linear(F.linear(h, self.lora_A.to(h.dtype)), (self.lora_B * self.scaling).to(h.dtype))

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # fp32 [out, in]

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.merged else self.weight + self.delta().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·BA in place (computed in fp32). On a bf16 base, merge then unmerge is exact only to bf16 rounding."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class LoraExperts(nn.Module):
    """The routed experts' stacked weights plus one low-rank update per expert (peft's `target_parameters`).

    The update is folded into the weights once per forward (W_e + s·B_e A_e for all experts in one bmm), then the
    experts run their usual grouped kernel: the same trade peft makes, costing one weight-sized temporary."""

    def __init__(
        self, base: Experts, r: int, scaling: float, gate_up_r: int | None = None, gate_up_scaling: float | None = None
    ) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        E, two_h, d = base.gate_up_proj.shape
        h = base.down_proj.shape[2]
        dev = base.gate_up_proj.device
        # gate|up is one fused matrix: apply_lora gives it rank 2r at alpha 2·alpha (one r each for gate and up), as
        # peft does when it maps gate_proj+up_proj targets onto a fused gate_up_proj; an adapter may say otherwise.
        gr = gate_up_r or r
        self.gate_up_A = nn.Parameter(torch.empty(E, gr, d, dtype=torch.float32, device=dev))
        self.gate_up_B = nn.Parameter(torch.zeros(E, two_h, gr, dtype=torch.float32, device=dev))
        self.down_A = nn.Parameter(torch.empty(E, r, h, dtype=torch.float32, device=dev))
        self.down_B = nn.Parameter(torch.zeros(E, d, r, dtype=torch.float32, device=dev))
        if dev.type != "meta":
            for A in (self.gate_up_A, self.down_A):  # the bounds nn.Linear's init gives an [E·r, in] matrix
                nn.init.uniform_(A, -1 / math.sqrt(A.shape[-1]), 1 / math.sqrt(A.shape[-1]))
        # rank 2r at alpha 2·alpha is the same alpha/r, but not the same rsLoRA alpha/sqrt(r): each pair keeps its own
        self.r, self.scaling = r, scaling
        self.gate_up_scaling = scaling if gate_up_scaling is None else gate_up_scaling
        self.merged = False

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.bmm(self.gate_up_B, self.gate_up_A) * self.gate_up_scaling,
            torch.bmm(self.down_B, self.down_A) * self.scaling,
        )

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return Experts.run(x_sorted, counts, self.gate_up_proj, self.down_proj)
        d_gate_up, d_down = self.deltas()
        dt = x_sorted.dtype
        return Experts.run(
            x_sorted, counts, self.gate_up_proj.to(dt) + d_gate_up.to(dt), self.down_proj.to(dt) + d_down.to(dt)
        )

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for w, d in zip((self.gate_up_proj, self.down_proj), self.deltas()):
                w.copy_((w.float() + d).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for w, d in zip((self.gate_up_proj, self.down_proj), self.deltas()):
                w.copy_((w.float() - d).to(w.dtype))
            self.merged = False


# --- applying, merging, removing -----------------------------------------------------------------------------------
def _hf_module(model: nn.Module, native: str) -> str:
    return native_to_hf(model.config, native + ".weight").removesuffix(".weight")


def _target_layers(model: nn.Module, cfg: LoraConfig) -> dict[str, nn.Module]:
    """Native module name -> the layer to adapt: matching linear layers of the main blocks (+ routed experts)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue  # embeddings, the head and the MTP modules keep the base weights
        if isinstance(module, nn.Linear) and matches(cfg.targets, _hf_module(model, name)):
            found[name] = module
        elif isinstance(module, Experts) and cfg.experts:
            found[name] = module
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_lora(model: nn.Module, cfg: LoraConfig, *, freeze: bool = True) -> nn.Module:
    """Adapt `model` in place: every target layer gets a LoRA update; with `freeze`, everything else stops training.
    Adds `model.save_adapter(dir)` (peft's `save_pretrained`). Returns the model."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; merge_lora(model) or remove_lora(model) first.")
    layers = _target_layers(model, cfg)
    if not layers:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {cfg.targets!r} match no layer of this model; its linear layers are {names}.")
    if freeze:
        model.requires_grad_(False)
    for name, layer in layers.items():
        if isinstance(layer, Experts):
            experts = LoraExperts(layer, cfg.r, cfg.scaling(), 2 * cfg.r, cfg.scaling(2 * cfg.r, 2 * cfg.alpha))
            _replace(model, name, experts)
        else:
            _replace(model, name, LoraLinear(layer, cfg.r, cfg.scaling(), cfg.dropout))
    _bind(model, cfg)
    return model


def _bind(model: nn.Module, cfg: LoraConfig) -> None:
    """peft's PeftModel methods, on the model itself: `save_adapter(dir)` writes the adapter alone, and
    `save_pretrained(dir)` an ordinary HF checkpoint with the adapter merged in (the model itself stays unmerged)."""
    from deepsail.model.hf import save_hf

    model.lora_config = cfg
    model.save_adapter = types.MethodType(save_adapter, model)
    model.save_pretrained = types.MethodType(
        lambda self, path, dtype=None, max_shard_size="5GB": save_hf(
            self, path, dtype, max_shard_size, state=merged_state_dict(self)
        ),
        model,
    )


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (fp32 math), without the LoRA tensors."""
    layers = lora_layers(model)
    state = {k: v for k, v in model.state_dict().items() if not is_lora_param(k)}
    for name, layer in layers.items():
        if layer.merged:
            continue
        if isinstance(layer, LoraExperts):
            for param, delta in zip(("gate_up_proj", "down_proj"), layer.deltas()):
                w = state[f"{name}.{param}"]
                state[f"{name}.{param}"] = (w.float() + delta.detach()).to(w.dtype)
        else:
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float() + layer.delta().detach()).to(w.dtype)
    return state


def lora_layers(model: nn.Module) -> dict[str, LoraLinear | LoraExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear | LoraExperts)}


def is_lora_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B", "gate_up_A", "gate_up_B", "down_A", "down_B")


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain layers back (with the update merged in, unless `merge=False` drops it): the model is a plain
    deepsail model again, which `save_pretrained` writes as an ordinary HF checkpoint."""
    from deepsail.model.layers import Linear

    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        if isinstance(layer, LoraExperts):
            plain = Experts.__new__(Experts)
            nn.Module.__init__(plain)
            plain.gate_up_proj, plain.down_proj = layer.gate_up_proj, layer.down_proj
        else:
            plain = Linear.__new__(Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = layer.in_features, layer.out_features
            plain.weight, plain.bias = layer.weight, layer.bias
        _replace(model, name, plain)
    for attr in ("lora_config", "save_adapter", "save_pretrained"):
        model.__dict__.pop(attr, None)
    return model


# --- PEFT's format: save ---------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (fp32, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        key = PEFT_PREFIX + _hf_module(model, name)
        if isinstance(layer, LoraExperts):
            E = layer.gate_up_A.shape[0]
            for inner, (A, B) in (
                (".base_layer", (layer.gate_up_A, layer.gate_up_B)),  # peft wraps gate_up_proj first (innermost)
                ("", (layer.down_A, layer.down_B)),
            ):
                r = A.shape[1]
                out[f"{key}{inner}.lora_A.weight"] = A.detach().float().reshape(E * r, -1).contiguous()
                # peft's B column j·E + e is expert e's rank-j column
                out[f"{key}{inner}.lora_B.weight"] = B.detach().float().permute(1, 2, 0).reshape(B.shape[1], r * E)
        else:
            out[f"{key}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
            out[f"{key}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
    return {k: v.contiguous() for k, v in out.items()}


def _peft_targets(model: nn.Module) -> list[str] | str:
    """target_modules for adapter_config.json: the leaf names when they pick out exactly the adapted layers (the
    readable form), else an exact regex of the adapted module names."""
    adapted = {_hf_module(model, n) for n, m in lora_layers(model).items() if isinstance(m, LoraLinear)}
    leaves = tuple(sorted({n.rsplit(".", 1)[-1] for n in adapted}))
    linear_names = [_hf_module(model, n) for n, m in model.named_modules() if isinstance(m, nn.Linear | LoraLinear)]
    if {n for n in linear_names if matches(leaves, n)} == adapted:
        return list(leaves)
    return "^(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")$"


def write_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` into `folder` (one being written: not atomic by itself)."""
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise ValueError("this model has no LoRA adapter to save; apply_lora(model, LoraConfig(...)) first.")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the adapter is merged into the base weights; unmerge_lora(model) before save_adapter.")
    experts = any(isinstance(m, LoraExperts) for m in lora_layers(model).values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout if not experts else 0.0,  # peft refuses dropout on target_parameters
        "target_modules": _peft_targets(model),
        "target_parameters": list(EXPERT_PARAMS) if experts else None,
        # the fused gate|up weight at twice the rank and alpha (what peft records for a fused gate_up_proj)
        "rank_pattern": {r".*\.gate_up_proj": 2 * cfg.r} if experts else {},
        "alpha_pattern": {r".*\.gate_up_proj": 2 * cfg.alpha} if experts else {},
        "use_rslora": cfg.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_state(model), str(Path(folder) / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in peft's layout, atomically: `adapter_config.json` + `adapter_model.safetensors`."""
    mlp = {n.rsplit(".", 1)[-1] for n, m in lora_layers(model).items() if isinstance(m, LoraLinear)}
    if model.config.is_moe and mlp & {"gate_proj", "up_proj", "down_proj"}:
        # peft/tuners' transformers_weight_conversion: on deepseek_v3 (as qwen2_moe) these names become the routed
        # experts' fused weights and the dense/shared MLP adapters are dropped.
        warnings.warn(
            "this adapter has dense/shared-expert MLP layers on a MoE model; deepsail loads it exactly, but peft "
            "(0.18+ with transformers 5) re-maps gate_proj/up_proj/down_proj targets to the routed experts and "
            "drops those layers. Adapt attention only (--lora-targets) for an adapter peft reads the same.",
            stacklevel=2,
        )
    with atomic_dir(path) as tmp:
        write_adapter(model, tmp, base_model_name_or_path)
    return Path(path)


# --- PEFT's format: load ---------------------------------------------------------------------------------------------
def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    """The adapter's LoraConfig, and peft's whole config dict. Anything deepsail cannot apply exactly is refused."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise ValueError(f"{path} is not a LoRA adapter folder: it has no {ADAPTER_CONFIG} (peft's layout).")
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{file} is not a readable adapter config ({e}).") from e
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r}; deepsail reads LoRA adapters only.")
    for key, fine in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
        if raw.get(key, fine) != fine:
            raise ValueError(
                f"{file}: {key}={raw[key]!r} is not supported (deepsail applies plain LoRA: {key}={fine!r})."
            )
    if raw.get("layer_replication") or raw.get("trainable_token_indices"):
        raise ValueError(f"{file}: layer_replication / trainable_token_indices are not supported.")
    targets = raw.get("target_modules") or ()
    if isinstance(targets, list):
        targets = tuple(targets)
    if targets == "all-linear":
        targets = DEFAULT_TARGETS
    try:
        cfg = LoraConfig(
            r=int(raw.get("r", 8)),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
            targets=targets or DEFAULT_TARGETS,
            rslora=bool(raw.get("use_rslora", False)),
            experts=bool(raw.get("target_parameters")),
        )
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    return cfg, raw


def _pattern_value(patterns: Mapping[str, Any], hf_name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{path} holds adapter_model.bin (a pickle); deepsail loads only safetensors. Re-save it with "
                "peft's save_pretrained(..., safe_serialization=True)."
            )
        raise ValueError(f"{path}: {ADAPTER_WEIGHTS} is missing.")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}).") from e


def read_adapter(model: nn.Module, path: str | Path) -> tuple[LoraConfig, dict[str, dict[str, Any]]]:
    """The adapter in `path`, checked against `model`: its LoraConfig, and per native layer name either
    {"A", "B", "scaling"} (a linear layer) or {"gate_up": (A, B), "down": (A, B), "scaling"} (routed experts, as
    [E, r, in] / [E, out, r]). Nothing is applied; a tensor that does not fit this base is a ValueError."""
    path = Path(path)
    cfg, raw = read_adapter_config(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _read_adapter_tensors(path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+?)(\.base_layer)?\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight deepsail can apply.")
        native = hf_to_native(model.config, m.group(1) + ".weight")
        native = native.removesuffix(".weight") if native else m.group(1)
        grouped.setdefault(native, {})[("inner_" if m.group(2) else "") + m.group(3)] = t
    if not grouped:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} holds no LoRA tensors.")
    outside = sorted(n for n in grouped if not n.startswith("layers."))
    if outside:
        raise ValueError(
            f"adapter {path} adapts {outside[:4]}: deepsail applies LoRA to the decoder blocks only (not the head, "
            "embeddings or MTP modules, where a merge would also change a tied embedding)."
        )
    modules = dict(model.named_modules())
    missing = [n for n in sorted(grouped) if n not in modules]
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise ValueError(
            f"adapter {path} does not fit this base model (was it trained on another one?): it adapts layers this "
            f"model does not have: {shown}"
        )
    alpha_pattern = raw.get("alpha_pattern") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, t in grouped.items():
        layer, hf = modules[name], _hf_module(model, name)
        if isinstance(layer, Experts):
            out[name] = _expert_weights(layer, t, cfg, path, hf, alpha_pattern)
            continue
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"adapter {path}: {hf} is a {type(layer).__name__}, not a layer LoRA can adapt.")
        A, B = t.get("A"), t.get("B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"adapter {path}: {hf} needs a 2-D lora_A and lora_B.")
        r = A.shape[0]
        if A.shape[1] != layer.in_features or tuple(B.shape) != (layer.out_features, r):
            raise ValueError(
                f"adapter {path} does not fit this base model: {hf} has in={layer.in_features}, "
                f"out={layer.out_features}, but the adapter's lora_A is {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)} (was it trained on another base?)"
            )
        # the rank is the tensors' own; a per-module alpha follows peft's alpha_pattern
        alpha = float(_pattern_value(alpha_pattern, hf, cfg.alpha))
        out[name] = {"A": A.float(), "B": B.float(), "scaling": cfg.scaling(r, alpha)}
    return cfg, out


def load_adapter(model: nn.Module, path: str | Path, *, freeze: bool = True) -> nn.Module:
    """Apply the peft-format adapter in `path` to `model` in place (unmerged), checking it was made for this base."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; remove_lora(model) before loading another.")
    cfg, weights = read_adapter(model, path)
    modules = dict(model.named_modules())
    if freeze:
        model.requires_grad_(False)
    for name, w in weights.items():
        layer = modules[name]
        if isinstance(layer, Experts):
            (gA, gB), (dA, dB) = w["gate_up"], w["down"]
            new = LoraExperts(layer, dA.shape[1], w["scaling"], gA.shape[1], w["gate_up_scaling"])
            params = ((new.gate_up_A, gA), (new.gate_up_B, gB), (new.down_A, dA), (new.down_B, dB))
        else:
            new = LoraLinear(layer, w["A"].shape[0], w["scaling"], cfg.dropout)
            params = ((new.lora_A, w["A"]), (new.lora_B, w["B"]))
        with torch.no_grad():
            for p, t in params:
                p.copy_(t.to(p.device))
        _replace(model, name, new)
    _bind(model, cfg)
    return model


def _expert_weights(
    layer: Experts, t: dict[str, torch.Tensor], cfg: LoraConfig, path: Path, hf: str, alpha_pattern: Mapping[str, Any]
) -> dict[str, Any]:
    """peft's expert tensors (A [E·r, in], B [out, r·E]) as per-expert [E, r, in] / [E, out, r]. Which pair is gate|up
    and which is down is read from the shapes (peft nests gate_up_proj innermost: the tie-break when they agree)."""
    E, two_h, d = layer.gate_up_proj.shape
    h = layer.down_proj.shape[2]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix in ("inner_", ""):
        A, B = t.get(prefix + "A"), t.get(prefix + "B")
        if A is None or B is None:
            continue
        ok = A.dim() == 2 and B.dim() == 2 and A.shape[0] % E == 0 and B.shape[1] == A.shape[0]
        which = "gate_up" if ok and (A.shape[1], B.shape[0]) == (d, two_h) and "gate_up" not in pairs else "down"
        if not ok or (A.shape[1], B.shape[0]) != ((d, two_h) if which == "gate_up" else (h, d)):
            raise ValueError(
                f"adapter {path} does not fit this base model: {hf} ({E} experts, hidden {d}, expert width {h}) "
                f"cannot take expert LoRA tensors {tuple(A.shape)} / {tuple(B.shape)}."
            )
        r = A.shape[0] // E
        pairs[which] = (A.float().reshape(E, r, -1), B.float().reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous())
    if set(pairs) != {"gate_up", "down"}:
        raise ValueError(f"adapter {path}: {hf} needs LoRA tensors for both gate_up_proj and down_proj.")
    r, gate_up_r = pairs["down"][0].shape[1], pairs["gate_up"][0].shape[1]
    alpha = float(_pattern_value(alpha_pattern, hf + ".gate_up_proj", cfg.alpha))
    return {**pairs, "scaling": cfg.scaling(r, cfg.alpha), "gate_up_scaling": cfg.scaling(gate_up_r, alpha)}


# --- several adapters on one base, chosen per batch row -------------------------------------------------------------
class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus N frozen adapters; each batch row uses adapter `rows[b]` (0 = none)."""

    def __init__(self, base: nn.Linear, adapters: AdapterSet) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapters = adapters
        self.pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]  # index 0: the base model
        self._merged: dict[int, torch.Tensor] = {}

    def add(self, A: torch.Tensor | None, B_scaled: torch.Tensor | None) -> None:
        dt = self.weight.dtype
        self.pairs.append(None if A is None else (A.to(dt), B_scaled.to(dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        groups = self.adapters.groups
        if not groups:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for k, tokens in groups:
            pair = self.pairs[k]
            if pair is None:
                continue
            A, B = pair
            if tokens is None:  # every row uses adapter k
                flat_y += F.linear(F.linear(flat_x, A.to(x.dtype)), B.to(x.dtype)).to(y.dtype)
            else:
                flat_y.index_add_(
                    0,
                    tokens,
                    F.linear(F.linear(flat_x.index_select(0, tokens), A.to(x.dtype)), B.to(x.dtype)).to(y.dtype),
                )
        return y

    def effective_weight(self) -> torch.Tensor:
        """[out, in] when every row uses the same adapter (the common case); else one merged matrix per row,
        [B, out, in]: B copies of this layer's weight (MLA's kv_b_proj is small, 1/60 of a V3 layer; a low-rank
        correction inside the absorbed attention would avoid the copies)."""
        rows = self.adapters.row_list
        if not rows or all(self.pairs[k] is None for k in set(rows)):
            return self.weight
        for k in set(rows):
            if k not in self._merged:  # adapters are frozen while served: merge each once
                pair = self.pairs[k]
                self._merged[k] = self.weight if pair is None else self.weight + (pair[1] @ pair[0])
        if len(set(rows)) == 1:
            return self._merged[rows[0]]
        return torch.stack([self._merged[k] for k in rows])


class AdapterSet:
    """Named adapters served together on one base model (`deepsail serve BASE --adapter finance=DIR ...`).

    `AdapterSet(model, {"finance": dir, ...})` wraps every layer any adapter touches; then each forward runs inside
    `with adapters.rows(adapter_per_row, T):`. Adapter index 0 is the base model."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | Path]) -> None:
        if lora_layers(model):
            raise ValueError("the base model already carries a LoRA adapter; serve adapters on a plain base.")
        self.names: list[str] = []
        self.paths: dict[str, str] = {}
        self.rows: torch.Tensor | None = None
        self.row_list: list[int] = []  # the same on the host: no device sync per layer
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        per_adapter: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        modules = dict(model.named_modules())
        for name, path in adapters.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64).")
            if name in self.names:
                raise ValueError(f"adapter name {name!r} is given twice.")
            _, weights = read_adapter(model, path)
            layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for lname, w in weights.items():
                if "gate_up" in w:
                    raise ValueError(
                        f"adapter {name} ({path}) adapts the routed experts, which per-request serving does not "
                        "support; serve it merged (deepsail finetune writes a merged model too)."
                    )
                layers[lname] = (w["A"], w["B"] * w["scaling"])
            self.names.append(name)
            self.paths[name] = str(path)
            per_adapter.append(layers)
        touched = sorted(set().union(*(set(a) for a in per_adapter))) if per_adapter else []
        for lname in touched:
            wrapped = MultiLoraLinear(modules[lname], self)
            for layers in per_adapter:
                pair = layers.get(lname)
                device = wrapped.weight.device
                wrapped.add(*(None, None) if pair is None else (pair[0].to(device), pair[1].to(device)))
            _replace(model, lname, wrapped)

    def index(self, name: str | None) -> int:
        """0 for the base model (None), else the adapter's 1-based index; KeyError for an unknown name."""
        return 0 if name is None else self.names.index(name) + 1

    @contextmanager
    def select(self, adapter_per_row: Sequence[int], T: int, device: torch.device) -> Iterator[None]:
        """Rows of the next forward ([B] adapter indices; each row T tokens wide) use these adapters."""
        rows = torch.tensor(list(adapter_per_row), dtype=torch.long, device=device)
        kinds = sorted(set(adapter_per_row))
        if kinds == [0]:
            self.groups = []
        elif len(kinds) == 1:
            self.groups = [(kinds[0], None)]
        else:
            per_token = rows.repeat_interleave(T)
            self.groups = [(k, (per_token == k).nonzero().squeeze(1)) for k in kinds if k]
        self.rows, self.row_list = rows, list(adapter_per_row)
        try:
            yield
        finally:
            self.groups, self.rows, self.row_list = [], None, []


def lora_config_dict(cfg: LoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg) | {"targets": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)}
