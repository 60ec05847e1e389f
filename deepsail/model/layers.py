"""The small pieces every block is made of: linear layers, RMSNorm, rotary embeddings (plain, YaRN, Llama-3), the
SwiGLU MLP."""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 sums of squares lose too much.
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).type_as(x)


SMALL_ROWS = 4  # up to this many rows (decode, speculative verification) may take the weight-major route


@functools.cache
def weight_major_wins() -> bool:
    """Whether (W·xᵀ)ᵀ beats F.linear's x·Wᵀ for 1-2 rows of fp32 on this CPU's BLAS, measured once per process.

    Both compute the same product; BLAS picks different kernels for them. With MKL on AMD Zen 4 the weight-major
    form runs 2-5x faster on weights that do not fit in cache (a 2048x512 matrix: 419 -> 202 us for one row,
    667 -> 160 us for two), while elsewhere x·Wᵀ may be the fast one — so it is timed here, on 64 MB of weights
    (beyond cache, as a decode step's are), ~0.1 s once."""
    mats = [torch.full((2048, 512), 0.01) for _ in range(16)]
    times = {False: 0.0, True: 0.0}
    for rows in (1, 2):
        x = torch.full((rows, 512), 0.5)
        for r in range(3):
            for route in (False, True):
                t0 = time.perf_counter()
                for w in mats:
                    _weight_major(x, w, None) if route else F.linear(x, w)
                if r:
                    times[route] += time.perf_counter() - t0
    _MEASURED["weight_major"] = times[True] < 0.8 * times[False]
    return _MEASURED["weight_major"]


_MEASURED: dict[str, bool] = {}  # weight_major_wins' answer, for traced code (which reads, never measures)


def _weight_major(x_RD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x_RD.shape[0]
    # The fast kernel wants at least two columns in xᵀ: one row is padded with a zero row and the result cut back.
    y = torch.mm(weight, (F.pad(x_RD, (0, 0, 0, 1)) if rows == 1 else x_RD).t()).t()
    if rows == 1:
        y = y[:1]
    return y + bias if bias is not None else y


def weight_major_applies(x: torch.Tensor) -> bool:
    """Whether few-row products of `x` may take the weight-major route: fp32 on CPU, outside autograd, not in an
    exported graph, on a machine where it wins. Cheapest checks first: this runs ~100 times per token. A compiled
    decode step takes the route too (2.2x its tok/s on deepseek-v3-small) once `weight_major_wins` has been
    measured eagerly: the measurement itself cannot be traced."""
    if not (x.is_cpu and x.dtype is torch.float32 and not torch.is_grad_enabled()):
        return False
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting() and _MEASURED.get("weight_major", False)
    return weight_major_wins()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a few fp32 rows on CPU outside autograd take the weight-major route where this
    machine's BLAS runs it faster (see `weight_major_wins`): decode reads every weight for 1-4 rows per step."""
    # The size test last: traced (torch.export), it would become a guard on the batch and sequence dims.
    if weight.dtype is torch.float32 and weight_major_applies(x) and 0 < x.numel() <= SMALL_ROWS * weight.shape[1]:
        if x.dim() == 2:
            return _weight_major(x, weight, bias)
        return _weight_major(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear`: fast few-row decode on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] matrix this layer applies. Code that uses a layer's matrix directly (MLA's absorbed decode
        folds kv_b_proj into the query) asks for it here, so a layer wrapped from outside (LoRA, one adapter per
        batch row: [B, out, in]) stays correct."""
        return self.weight


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding and the factor its cos/sin are multiplied by.

    YaRN (DeepSeek's long-context scaling) interpolates low frequencies by `factor`, keeps high ones, ramps in between,
    and multiplies cos/sin by mscale(factor, mscale)/mscale(factor, mscale_all_dim). Llama-3 divides low frequencies
    by `factor` with a smooth band. Always computed on the CPU in fp32 so a meta-device build still gets real values.
    """
    dim, base = config.rope_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    s = config.rope_scaling or {}
    if config.rope_type == "yarn":
        factor, original = s["factor"], s["original_max_position_embeddings"]
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        return inv_freq, float(attention_factor)
    if config.rope_type == "llama3":
        factor, original = s["factor"], s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = original / s["low_freq_factor"], original / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """fp32 cos/sin for given positions, shaped [B or 1, 1, T, dim/2] to broadcast over heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        # A plain attribute, not a buffer: it is derived from the config, never saved, and must survive to_empty().
        self._inv_freq = {torch.device("cpu"): inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq(positions.device)
        if angles.dim() == 2:  # [T, d/2] shared by the batch
            angles = angles[None]
        angles = angles[:, None]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x [B, H, T, d] by the position angles.

    Llama/Qwen rotate the two halves of the head dim against each other; DeepSeek checkpoints rotate adjacent pairs.
    Both return the rotated pairs as [real halves | imaginary halves]: queries and keys go through the same map, so
    their dot products (all attention ever sees) are those of the interleaved rotation.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
