"""Weight quantization from outside the model: int8, int4 and dynamic int8 layers swapped in for the float ones.

    quantize(model, "int4", group_size=64)      # in place: every projection, the routed experts included
    model.save_pretrained("runs/base-int4")     # config.json + quantization_config, model.safetensors
    ds.from_pretrained("runs/base-int4")        # detected from config.json, no flag

Methods (the same math for the converter and for QAT's fake quantization, `qat.py`):
- `int8`: weight-only, symmetric, one scale per output channel: w ≈ q·s, q int8 in [-127, 127].
- `int4`: weight-only, groups of `group_size` along the input dim, asymmetric: w ≈ (q - 8)·s + z, q in [0, 15],
  z the value of the middle code (the convention of PyTorch's int4 kernels, checked against a plain dequantize in
  tests/test_quantize.py).
- `int8-dynamic`: int8 weights as `int8` (same file), and each activation row quantized to int8 at run time
  (symmetric, one scale per token): y = (q_x q_wᵀ)·s_x·s_w with an int32 accumulation.
Scales and zeros are bfloat16 (the kernels read them in bf16), and every code is computed from the rounded scale,
so the stored tensors say exactly which weights the layer applies.

Which layers: every linear layer (MLA's and GQA's projections, dense MLPs, shared experts, MTP modules, the output
head) and the routed experts' stacked weights, minus `skip`. Embeddings, norms and the router (`mlp.gate`, not a
linear layer) always stay float. A tied output head is the embedding and stays float too.

Kernels (which path runs where), chosen per layer once per device and dtype when the model is loaded:
- CPU: `torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu` (weights repacked at load) and
  `torch._int_mm`, all fed bf16 (int8/int4) activations — see `_run_for` for the measurements behind each choice;
- CUDA: `torch._weight_int4pack_mm` (tinygemm), `torch._weight_int8pack_mm` where this build has a CUDA kernel
  for it, `torch._int_mm` above 16 rows; each fast path is checked once against the dequantized product when it
  is built, and anything else (another device, a shape a kernel refuses) multiplies by the dequantized weight.

Saved format, this module's alone (the one seam for quantized folders): `model.safetensors` with plain tensors
under HF names — `...q_proj.weight` (int8 [out, in], or uint8 [out, in/2] holding two int4 codes per byte, the
even column in the low nibble), `...q_proj.weight_scale` (bf16 [out] or [out, in/group]) and, for int4,
`...q_proj.weight_zero`; routed experts one tensor set per expert (`...mlp.experts.{e}.gate_proj.weight`, ...),
as the float checkpoints store them. `config.json` is the float model's plus HF's `quantization_config`
({"quant_method": "deepsail", "method", "group_size", "modules_not_converted"}). Never pickle; the CPU kernel's own
packed layout is never written (it is rebuilt at load).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deepsail.files import atomic_dir
from deepsail.flags import knob
from deepsail.model.hf import (
    _KEEP_FP32,
    WEIGHT_FILES,
    config_to_hf,
    deepsail_section,
    hf_to_native,
    native_to_hf,
    read_config,
)
from deepsail.model.moe import Experts
from deepsail.precision import hf_dtype_name, to_dtype

METHODS = ("int8", "int4", "int8-dynamic")
GROUP_SIZES = (32, 64, 128)
QUANT_METHOD = "deepsail"  # quantization_config.quant_method
SCALE_DTYPE = torch.bfloat16
_EPS = 1e-10  # the smallest scale: an all-zero row or group quantizes to zeros, not NaN
# Files of a model folder that travel with its quantized copy (the tokenizer, generation defaults).
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|chat_template\.jinja|generation_config\.json)$"
)


@dataclass
class QuantConfig:
    """How to quantize a model: `deepsail quantize`'s flags, and `quantization_config` in the saved config.json."""

    method: str = knob("int8", "int8 (weight-only, per channel) | int4 (weight-only, per group) | int8-dynamic.")
    group_size: int = knob(64, "int4 only: weights per scale/zero group, along the input dim (32, 64 or 128).")
    skip: tuple[str, ...] = knob(
        ("lm_head",),
        "Layers kept float, by name or dotted prefix/suffix (lm_head, kv_b_proj, layers.0, mtp; none: no layer); "
        "repeat the flag.",
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not a quantization method; choose one of {list(METHODS)}.")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size {self.group_size}: int4 groups of {' / '.join(map(str, GROUP_SIZES))}.")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        if len(self.skip) == 1 and "," in self.skip[0]:
            self.skip = tuple(s.strip() for s in self.skip[0].split(",") if s.strip())
        self.skip = tuple(s for s in self.skip if s not in ("none", ""))  # `--skip none`: quantize the head too

    @property
    def weight_method(self) -> str:
        """How the weights are stored: int8-dynamic stores what int8 stores."""
        return "int4" if self.method == "int4" else "int8"


# --- the math: float weights <-> codes, scales, zeros ----------------------------------------------------------------
def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scale bf16 [..., out]) with w ≈ q·scale."""
    w = w.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp(min=_EPS).to(SCALE_DTYPE)
    q = (w / scale.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q uint8 codes 0..15 [..., out, in], scale, zero bf16 [..., out, in/group]) with
    w ≈ (q - 8)·scale + zero per group: the group's min maps to 0, its max to 15."""
    w = w.detach().float()
    wg = w.unflatten(-1, (w.shape[-1] // group_size, group_size))
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=_EPS).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    q = ((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)
    return q.flatten(-2).to(torch.uint8), scale, zero


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes [..., out, in] (0..15), scale/zero [..., out, in/group] -> fp32 weights."""
    group_size = q.shape[-1] // scale.shape[-1]
    qg = q.float().unflatten(-1, (scale.shape[-1], group_size))
    return ((qg - 8) * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)


def fake_quantize(w: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    """The fp32 weights a quantized layer applies instead of `w` (no gradient: QAT adds the straight-through part)."""
    if method == "int4":
        return int4_dequantize(*int4_codes(w, group_size))
    q, scale = int8_codes(w)
    return q.float() * scale.float()[..., None]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., in] -> uint8 [..., in/2], column 2j in the low nibble, 2j+1 in the high one."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize_weight(w: torch.Tensor, method: str, group_size: int) -> dict[str, torch.Tensor]:
    """The stored tensors of a weight [..., out, in]: {"weight", "weight_scale"[, "weight_zero"]}."""
    if method == "int4":
        q, scale, zero = int4_codes(w, group_size)
        return {"weight": pack_nibbles(q), "weight_scale": scale, "weight_zero": zero}
    q, scale = int8_codes(w)
    return {"weight": q, "weight_scale": scale}


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight the stored tensors of `quantize_weight` stand for."""
    if "weight_zero" in t:
        return int4_dequantize(unpack_nibbles(t["weight"]), t["weight_scale"], t["weight_zero"])
    return t["weight"].float() * t["weight_scale"].float()[..., None]


def dequantize_as(t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` computed in `dtype` (bf16: a pass or two over the codes, for the prefill route of `_run_for`)."""
    if "weight_zero" in t:
        q, scale, zero = unpack_nibbles(t["weight"]).to(dtype), t["weight_scale"], t["weight_zero"]
        qg = q.unflatten(-1, (scale.shape[-1], q.shape[-1] // scale.shape[-1]))
        return ((qg - 8) * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).flatten(-2)
    return t["weight"].to(dtype) * t["weight_scale"].to(dtype)[..., None]


def _empty(method: str, shape: tuple[int, ...], group_size: int, device: Any) -> dict[str, torch.Tensor]:
    *lead, n, k = shape
    if method == "int4":
        return {
            "weight": torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device),
            "weight_scale": torch.empty(*lead, n, k // group_size, dtype=SCALE_DTYPE, device=device),
            "weight_zero": torch.empty(*lead, n, k // group_size, dtype=SCALE_DTYPE, device=device),
        }
    return {
        "weight": torch.empty(*lead, n, k, dtype=torch.int8, device=device),
        "weight_scale": torch.empty(*lead, n, dtype=SCALE_DTYPE, device=device),
    }


# --- kernels ---------------------------------------------------------------------------------------------------------
Run = Callable[[torch.Tensor], torch.Tensor]  # [M, in] -> [M, out]
# From this many rows (prefill) a CPU weight-only layer dequantizes its weight to bf16 and runs bf16 F.linear: the
# packed kernels cost ~10 us per row where the bf16 GEMM costs ~4. Crossovers measured on Zen 4: int8 at 32-128
# rows ([1408x512] 128 rows: 2497 -> 1266 us; [8192x512] 256 rows: 17.9 -> 7.7 ms), int4 (whose unpacking costs
# more) at 128-256 ([8192x512] 256 rows: 16.3 -> 10.7 ms; [512x256] 256 rows: even).
PREFILL_ROWS = {"int8": 128, "int4": 256}


@functools.cache
def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA")
    except (AttributeError, RuntimeError):
        return False


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the int8/int4 weight-only kernels are fed: bf16 unless the model computes in fp16."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _dequantized_run(t: dict[str, torch.Tensor]) -> Run:
    """The fallback: multiply by the dequantized weight, rebuilt per call (nothing float is kept around)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(t).to(x.dtype))

    return run


def _int4_cpu_run(t: dict[str, torch.Tensor], kdtype: torch.dtype) -> Run:
    w = t["weight"]
    n, group_size = w.shape[0], 2 * w.shape[1] // t["weight_scale"].shape[1]
    codes, scale, zero = unpack_nibbles(w), t["weight_scale"], t["weight_zero"]
    pad = -n % 16  # the CPU packing wants out % 16 == 0 (MLA's kv_a_proj is rank + rope wide): zero rows, cut off
    if pad:
        codes, scale, zero = (F.pad(v, (0, 0, 0, pad)) for v in (codes, scale, zero))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(kdtype)  # [in/group, out, 2]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= PREFILL_ROWS["int4"]:
            return F.linear(x.to(kdtype), dequantize_as(t, kdtype)).to(x.dtype)
        y = torch._weight_int4pack_mm_for_cpu(x.to(kdtype).contiguous(), packed, group_size, scales_zeros)
        return (y[:, :n] if pad else y).to(x.dtype)

    return run


def _int4_cuda_run(t: dict[str, torch.Tensor]) -> Run | None:
    """tinygemm (sm80+, bf16 activations): out % 8 == 0 and in % (16·inner_k_tiles) == 0, else None."""
    w = t["weight"]
    n, k = w.shape[0], 2 * w.shape[1]
    group_size = k // t["weight_scale"].shape[1]
    inner = next((i for i in (8, 4, 2) if k % (16 * i) == 0), None)
    if inner is None or n % 8 or torch.cuda.get_device_capability(w.device)[0] < 8:
        return None
    codes = unpack_nibbles(w)
    # this op takes two codes per byte with the even column in the HIGH nibble (torchao's own packing for it)
    packed = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous(), inner)
    scales_zeros = torch.stack((t["weight_scale"], t["weight_zero"]), dim=-1).transpose(0, 1).contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, group_size, scales_zeros).to(
            x.dtype
        )

    return run


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it starting on a 64-byte boundary: torch 2.13's CPU `_weight_int8pack_mm` reads its
    activation and weight with aligned vector loads and segfaults on others (tensors read from a safetensors file,
    a routed expert's rows sliced from a bf16 batch)."""
    return t if t.data_ptr() % 64 == 0 and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _int8_run(t: dict[str, torch.Tensor], kdtype: torch.dtype) -> Run:
    prefill = t["weight"].is_cpu
    w, scale = _aligned(t["weight"]), t["weight_scale"].to(kdtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        if prefill and x.shape[0] >= PREFILL_ROWS["int8"]:
            return F.linear(x.to(kdtype), dequantize_as(t, kdtype)).to(x.dtype)
        return torch._weight_int8pack_mm(_aligned(x.to(kdtype)), w, scale).to(x.dtype)

    return run


def _int8_dynamic_run(t: dict[str, torch.Tensor], fallback: Run) -> Run:
    w_t, w_scale = t["weight"].t(), t["weight_scale"].float()  # [in, out] as a view: _int_mm reads it as is
    cuda = w_t.is_cuda

    def run(x: torch.Tensor) -> torch.Tensor:
        if cuda and x.shape[0] <= 16:  # CUDA's _int_mm wants more than 16 rows: decode takes the weight-only path
            return fallback(x)
        xf = x.float()
        x_scale = xf.abs().amax(-1, keepdim=True).div_(127).clamp_(min=_EPS)
        xq = (xf / x_scale).round_().to(torch.int8)
        return torch._int_mm(xq, w_t).mul(x_scale).mul_(w_scale).to(x.dtype)

    return run


def _checked(fast: Run, t: dict[str, torch.Tensor], where: str) -> Run | None:
    """A CUDA fast path, tried once on a few rows against the dequantized product: None when it fails or differs
    (this code cannot be exercised in CI, so a kernel that changed its contract falls back instead of crashing)."""
    w = dequantize(t)
    x = torch.randn(17, w.shape[1], device=w.device, generator=torch.Generator(w.device).manual_seed(0))
    try:
        y = fast(x.to(torch.bfloat16)).float()
    except RuntimeError as e:
        warnings.warn(
            f"{where}: the quantized kernel failed ({e}); multiplying by the dequantized weight", stacklevel=3
        )
        return None
    ref = x.to(torch.bfloat16).float() @ w.t()
    if not torch.allclose(y, ref, rtol=0.05, atol=0.05 * float(ref.abs().mean())):
        warnings.warn(
            f"{where}: the quantized kernel disagrees with the dequantized weight; using the latter", stacklevel=3
        )
        return None
    return fast


def _run_for(t: dict[str, torch.Tensor], method: str, dtype: torch.dtype, where: str) -> Run:
    """The product of one stored weight for activations of `dtype` on the tensors' device.

    CPU choices, measured on a 2-core Zen 4 (AVX512-BF16/VNNI), torch 2.13, torchao 0.18, deepseek-v3-small
    shapes, us per call at 1 / 8 / 512 rows (`python benchmarks/quant_bench.py --kernels` prints the whole table):
    - the int8/int4 weight-only kernels run 3-40x slower on fp32 activations than on bf16 ones (dense down
      [512x1408]: int8 401 / 3294 / 230797 on fp32 x; 46 / 107 / 5527 here): activations are cast to bf16 for them
      and the outputs back;
    - decode, these direct calls vs fp32 `linear` vs torchao's `quantize_` on an nn.Linear (its fastest of an fp32
      or a bf16 module): dense down int8 46 / 107 vs fp32 149 / 191 vs torchao 200 / 245; int4 (g64) 42 / 111 vs
      torchao's CPU layout (PrototypeInt4WeightOnlyConfig) 70 / 138; lm_head [8192x512] int8 174 / 682, int4
      159 / 573 vs fp32 757 / 3185 vs torchao 919 / 1305 and 193 / 639 — torchao runs the same ops behind a tensor
      subclass, whose dispatch costs ~20-150 us a call, and feeds them fp32 activations in an fp32 model;
    - prefill: the packed kernels lose to a bf16 GEMM (dense down 512 rows: int8 5527, bf16 F.linear 2257), so
      from PREFILL_ROWS rows the weight is dequantized to bf16 for one F.linear (torchao's bf16 int8: 2808);
    - dynamic int8 (`torch._int_mm`, VNNI): 1795 at 512 rows (fp32 5664, torchao's 3217), 59 / 115 at 1 / 8.
    """
    device = t["weight"].device
    fallback = _dequantized_run(t)
    if device.type == "cpu":
        if method == "int4":
            return _int4_cpu_run(t, _kernel_dtype(dtype))
        run = _int8_run(t, _kernel_dtype(dtype))
        return _int8_dynamic_run(t, run) if method == "int8-dynamic" else run
    if device.type != "cuda":
        return fallback
    if method == "int4":
        fast = _int4_cuda_run(t)
    else:
        fast = _int8_run(t, _kernel_dtype(dtype)) if _has_cuda_kernel("_weight_int8pack_mm") else None
        if method == "int8-dynamic" and _has_cuda_kernel("_int_mm"):
            fast = _int8_dynamic_run(t, fast or fallback)
    return (fast and _checked(fast, t, where)) or fallback


# --- the layers ------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer with quantized weights. State dict: `weight` (codes), `weight_scale`[, `weight_zero`][, `bias`];
    the kernel's own packing of them is built per device and dtype (at load, or on first use) and never saved."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, method: str, group_size: int, device: Any = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.method, self.group_size = (
            in_features,
            out_features,
            method,
            group_size,
        )
        wmethod = "int4" if method == "int4" else "int8"
        for name, t in _empty(wmethod, (out_features, in_features), group_size, device).items():
            self.register_buffer(name, t)
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._runs: dict[tuple[torch.device, torch.dtype], Run] = {}
        self._dequantized: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str, group_size: int) -> QuantLinear:
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, method, group_size, device=w.device)
        for name, t in quantize_weight(w, layer.weight_method, group_size).items():
            setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @property
    def weight_method(self) -> str:
        return "int4" if self.method == "int4" else "int8"

    def stored(self) -> dict[str, torch.Tensor]:
        names = ("weight", "weight_scale", "weight_zero") if self.method == "int4" else ("weight", "weight_scale")
        return {n: getattr(self, n) for n in names}

    def prepare(self, device: torch.device, dtype: torch.dtype) -> Run:
        key = (torch.device(device), dtype)
        if key not in self._runs:
            self._runs[key] = _run_for(self.stored(), self.method, dtype, f"{type(self).__name__}({self.extra_repr()})")
        return self._runs[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._runs.get((x.device, x.dtype)) or self.prepare(x.device, x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features) if x.dim() != 2 else x
        y = run(x2) if x2.shape[0] else x2.new_zeros(0, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features) if x.dim() != 2 else y

    def effective_weight(self) -> torch.Tensor:
        """The dequantized [out, in] matrix (MLA's absorbed decode folds kv_b_proj's into the query). Kept once per
        device: only kv_b_proj is asked for it, [heads·(nope + v), kv_lora_rank], a few hundred kB per layer."""
        key = (self.weight.device, torch.float32)
        if key not in self._dequantized:
            self._dequantized[key] = dequantize(self.stored())
        return self._dequantized[key]

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        out = super()._apply(fn, recurse)
        _drop_moved(self._runs, self.weight.device)  # .to(another device): rebuilt there on first use
        _drop_moved(self._dequantized, self.weight.device)
        return out

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.method}{group}"


class QuantExperts(nn.Module):
    """The routed experts with quantized stacked weights: `gate_up_proj` [E, 2H, D] and `down_proj` [E, D, H] as codes
    plus `*_scale` (and `*_zero`). `forward(x_sorted, counts)` keeps `Experts`' contract: a loop over the experts
    that have rows, one quantized product per expert and weight, never a loop over tokens."""

    def __init__(self, n_experts: int, dim: int, hidden: int, method: str, group_size: int, device: Any = None) -> None:
        super().__init__()
        self.n_experts, self.dim, self.hidden, self.method, self.group_size = n_experts, dim, hidden, method, group_size
        wmethod = "int4" if method == "int4" else "int8"
        for param, shape in (("gate_up_proj", (n_experts, 2 * hidden, dim)), ("down_proj", (n_experts, dim, hidden))):
            for name, t in _empty(wmethod, shape, group_size, device).items():
                self.register_buffer(name.replace("weight", param), t)
        self._runs: dict[tuple[torch.device, torch.dtype], tuple[list[Run], list[Run]]] = {}

    @classmethod
    def from_float(cls, experts: Experts, method: str, group_size: int) -> QuantExperts:
        E, two_h, d = experts.gate_up_proj.shape
        layer = cls(E, d, two_h // 2, method, group_size, device=experts.gate_up_proj.device)
        for param in ("gate_up_proj", "down_proj"):
            for name, t in quantize_weight(getattr(experts, param), layer.weight_method, group_size).items():
                setattr(layer, name.replace("weight", param), t)
        return layer

    @property
    def weight_method(self) -> str:
        return "int4" if self.method == "int4" else "int8"

    def stored(self, param: str, e: int | None = None) -> dict[str, torch.Tensor]:
        names = ("weight", "weight_scale", "weight_zero") if self.method == "int4" else ("weight", "weight_scale")
        return {
            n: getattr(self, n.replace("weight", param)) if e is None else getattr(self, n.replace("weight", param))[e]
            for n in names
        }

    def prepare(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Run], list[Run]]:
        key = (torch.device(device), dtype)
        if key not in self._runs:
            self._runs[key] = tuple(  # type: ignore[assignment]
                [_run_for(self.stored(p, e), self.method, dtype, f"experts.{e}.{p}") for e in range(self.n_experts)]
                for p in ("gate_up_proj", "down_proj")
            )
        return self._runs[key]

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate_up, down = self._runs.get((x_sorted.device, x_sorted.dtype)) or self.prepare(
            x_sorted.device, x_sorted.dtype
        )
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                g, u = gate_up[e](x_sorted[start : start + n]).chunk(2, dim=-1)
                out.append(down[e](F.silu(g) * u))
            start += n
        return torch.cat(out) if out else x_sorted.new_zeros(0, self.dim)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantExperts:
        out = super()._apply(fn, recurse)
        _drop_moved(self._runs, self.gate_up_proj.device)
        return out

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, {self.method}{group}"


QUANT_LAYERS = (QuantLinear, QuantExperts)


def _drop_moved(cache: dict[tuple[torch.device, torch.dtype], Any], device: torch.device) -> None:
    for key in [k for k in cache if k[0] != device]:
        del cache[key]


# --- which layers ----------------------------------------------------------------------------------------------------
def name_matches(patterns: Sequence[str], name: str) -> bool:
    """A module name matches a pattern equal to it, ending in "." + it, or starting with it + "."."""
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer quantization can replace: linear layers and routed experts (the router is neither)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | Experts)}


def _tied_head(model: nn.Module, name: str) -> bool:
    return name == "lm_head" and model.config.tie_word_embeddings


def _hf_module(config: Any, name: str) -> str:
    return native_to_hf(config, name + ".weight").removesuffix(".weight")


def _native_module(config: Any, hf_name: str) -> str:
    native = hf_to_native(config, hf_name + ".weight")
    return (native or hf_name).removesuffix(".weight")


def _check_widths(model: nn.Module, targets: dict[str, nn.Module], cfg: QuantConfig) -> None:
    if cfg.method != "int4":
        return
    g = cfg.group_size
    for name, m in targets.items():
        widths = (
            {"": m.in_features}
            if isinstance(m, nn.Linear)
            else {".gate_up_proj": m.gate_up_proj.shape[2], ".down_proj": m.down_proj.shape[2]}
        )
        for suffix, width in widths.items():
            if width % g:
                fits = [s for s in GROUP_SIZES if width % s == 0]
                raise ValueError(
                    f"int4 --group-size {g} does not divide the input width {width} of {name}{suffix}; choose "
                    + (f"--group-size {' or '.join(map(str, fits))}" if fits else "another method")
                    + f", or keep the layer float with --skip {name.rsplit('.', 1)[-1]}."
                )


def quantize(model: nn.Module, method: str | QuantConfig = "int8", **kw: Any) -> nn.Module:
    """Quantize `model` in place (see the module docstring); `method` is a method name (then `group_size=`,
    `skip=` may follow) or a QuantConfig. Adds `model.quantization_config` and a `save_pretrained` that writes the
    quantized folder. Returns the model."""
    cfg = method if isinstance(method, QuantConfig) else QuantConfig(method=method, **kw)
    if any(isinstance(m, QUANT_LAYERS) for m in model.modules()) or getattr(model, "quantization_config", None):
        method = (getattr(model, "quantization_config", None) or {}).get("method", "some layers")
        raise ValueError(f"this model is already quantized ({method}); quantize the float model it came from instead.")
    candidates = _candidates(model)
    kept = {n for n in candidates if name_matches(cfg.skip, n) or _tied_head(model, n)}
    targets = {n: m for n, m in candidates.items() if n not in kept}
    if not targets:
        raise ValueError(f"--skip {list(cfg.skip)} keeps every layer float: nothing would be quantized.")
    _check_widths(model, targets, cfg)
    with torch.no_grad():
        for name, m in targets.items():
            cls = QuantExperts if isinstance(m, Experts) else QuantLinear
            _replace(model, name, cls.from_float(m, cfg.method, cfg.group_size))
    _bind(model, cfg, sorted(kept))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _bind(model: nn.Module, cfg: QuantConfig, kept: list[str]) -> None:
    model.quantization_config = {
        "quant_method": QUANT_METHOD,
        "method": cfg.method,
        "group_size": cfg.group_size if cfg.method == "int4" else None,
        "modules_not_converted": [_hf_module(model.config, n) for n in kept],
    }
    model.save_pretrained = types.MethodType(
        lambda self, path, copy_from=None, **_: save_quantized(self, path, copy_from=copy_from), model
    )


def quant_layers(model: nn.Module) -> dict[str, QuantLinear | QuantExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


# --- save ------------------------------------------------------------------------------------------------------------
_EXPERT_PARAM = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale|_zero)?$")
_EXPERT_FILE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale|_zero)?$")


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model's tensors under HF names, one tensor set per routed expert (see the module docstring)."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and config.topk_method != "noaux_tc":
            continue
        m = _EXPERT_PARAM.match(name)
        if m is None:
            out[native_to_hf(config, name)] = t.detach().contiguous()
            continue
        base, param, kind = _hf_module(config, m.group(1)), m.group(2), m.group(3) or ""
        for e in range(t.shape[0]):
            if param == "gate_up_proj":
                h = t.shape[1] // 2
                out[f"{base}.{e}.gate_proj.weight{kind}"] = t[e, :h].contiguous()
                out[f"{base}.{e}.up_proj.weight{kind}"] = t[e, h:].contiguous()
            else:
                out[f"{base}.{e}.down_proj.weight{kind}"] = t[e].contiguous()
    return out


def save_quantized(model: nn.Module, path: str | Path, copy_from: str | Path | None = None) -> Path:
    """config.json (with `quantization_config`) + model.safetensors, written atomically; the tokenizer files of
    `copy_from` (the float model's folder) are copied along."""
    qc = getattr(model, "quantization_config", None)
    if not qc:
        raise ValueError("this model is not quantized; quantize(model, ...) first, or use its own save_pretrained.")
    tensors = quantized_state_dict(model)
    hf_config = config_to_hf(model.config, hf_dtype_name(model.embed_tokens.weight.dtype))
    hf_config["deepsail"] = deepsail_section(model.config)
    hf_config["quantization_config"] = qc
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                if f.is_file() and TOKENIZER_FILES.match(f.name):
                    shutil.copy2(f, tmp / f.name)
    return Path(path)


# --- load ------------------------------------------------------------------------------------------------------------
def quantization_config_of(path: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` of a model folder's config.json (None for a float model or no config.json)."""
    file = Path(path) / "config.json"
    try:
        qc = json.loads(file.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # read_config reports a missing or damaged config.json in its own words
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("method") not in METHODS:
        raise ValueError(
            f"{file}: quantization_config {qc!r} is not one deepsail wrote (quant_method 'deepsail', method one of "
            f"{list(METHODS)}); deepsail loads only its own quantized folders."
        )
    return qc


def load_quantized(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """A folder `save_quantized` wrote, as a quantized Transformer: built on the meta device, its layers replaced as
    config.json's `quantization_config` says, the tensors assigned, the kernels' packed weights built for `device`.
    `dtype` is that of everything kept float (embeddings, norms, router, skipped layers) and of the activations;
    default the saved one."""
    from deepsail.model import Transformer

    path, device = Path(path), torch.device(device)
    qc = quantization_config_of(path)
    if qc is None:
        raise ValueError(f"{path} is not a quantized model folder (its config.json has no quantization_config).")
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    kept = {_native_module(config, n) for n in qc.get("modules_not_converted") or []}
    group_size = qc.get("group_size") or 64
    for name, m in _candidates(model).items():
        if name in kept or _tied_head(model, name):
            continue
        if isinstance(m, Experts):
            E, two_h, d = m.gate_up_proj.shape
            new: nn.Module = QuantExperts(E, d, two_h // 2, qc["method"], group_size, device="meta")
        else:
            new = QuantLinear(m.in_features, m.out_features, m.bias is not None, qc["method"], group_size, "meta")
        _replace(model, name, new)
    state = _read_state(path, config)
    saved = next((t.dtype for k, t in state.items() if t.is_floating_point() and "embed_tokens" in k), torch.float32)
    want = saved if dtype is None or dtype == "auto" else to_dtype(dtype)
    quantized = {f"{n}.{b}" for n, m in quant_layers(model).items() for b, _ in m.named_buffers(recurse=False)}
    for k, t in state.items():
        if k not in quantized and t.is_floating_point():
            t = t.to(torch.float32 if k.endswith(_KEEP_FP32) else want)
        state[k] = t.to(device)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path / 'model.safetensors'} does not match its config.json's quantization_config ({qc['method']}): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    for m in quant_layers(model).values():
        m.prepare(next(m.buffers()).device, want)  # the kernels' packed weights, built once here
    cfg = QuantConfig(method=qc["method"], group_size=group_size, skip=tuple(sorted(kept)))
    _bind(model, cfg, sorted(kept))
    return model.eval()


def _read_state(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """model.safetensors under deepsail names, per-expert tensors stacked back into [E, ...]."""
    file = path / "model.safetensors"
    if not file.is_file():
        others = [f.name for f in path.iterdir() if WEIGHT_FILES.match(f.name)]
        raise ValueError(f"{path} has no model.safetensors" + (f" (found {others})" if others else ""))
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            # cloned: the reader's buffers are not 64-byte aligned, which the int8 kernel needs (see `_aligned`)
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError for short reads
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated or overwritten.") from e
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[str, str], dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for hf_name, t in tensors.items():
        m = _EXPERT_FILE.match(hf_name)
        if m:
            experts[_native_module(config, m.group(1))][(m.group(3), m.group(4) or "")][int(m.group(2))] = t
            continue
        native = hf_to_native(config, hf_name)
        if native is not None:
            state[native] = t
    for prefix, parts in experts.items():
        n = config.n_routed_experts
        for kind in ("", "_scale", "_zero"):
            if (("gate_proj", kind)) not in parts:
                continue
            per = {p: parts.get((p, kind), {}) for p in ("gate_proj", "up_proj", "down_proj")}
            if any(sorted(v) != list(range(n)) for v in per.values()):
                raise ValueError(f"{file}: {prefix} lacks some of experts 0..{n - 1}'s weight{kind} tensors")
            state[f"{prefix}.gate_up_proj{kind}"] = torch.stack(
                [torch.cat((per["gate_proj"][e], per["up_proj"][e])) for e in range(n)]
            )
            state[f"{prefix}.down_proj{kind}"] = torch.stack([per["down_proj"][e] for e in range(n)])
    return state
