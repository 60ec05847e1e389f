"""The one precision vocabulary: every verb's `--precision` / `--dtype`, and every Python `dtype=`, take these words.

    auto | fp32 | bf16 | fp16        (float32, bfloat16, float16 are accepted as the same three)

What "auto" becomes depends on the purpose:
- training (`deepsail pretrain --precision`): bf16 autocast on CUDA with bf16 and on CPUs with native bf16
  matmuls (AMX or AVX512-BF16), else fp32. Parameters and optimizer state stay fp32 in every mode.
- inference (`deepsail generate/chat/serve --dtype`, `ds.from_pretrained`): bf16 weights on CUDA, fp32 on CPU —
  batch-1 CPU decode reads every weight once per token and runs no faster in bf16 (measured 0.68-1.27x of fp32
  on a 2-core Zen 4), while fp32 keeps the few-row BLAS route of `model/layers.py`.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # config.json's "dtype"

PRECISION_HELP = "auto | fp32 | bf16 | fp16 (float32, bfloat16, float16 work too)"
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: cuda when available)"


def parse_precision(word: str | torch.dtype) -> str:
    """The canonical word (auto, fp32, bf16, fp16) for any accepted spelling or torch dtype."""
    if isinstance(word, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == word:
                return name
        raise ValueError(f"dtype {word} is not one deepsail computes in; use one of {', '.join(DTYPES)}")
    canonical = _ALIASES.get(str(word).lower(), str(word).lower())
    if canonical not in PRECISIONS:
        raise ValueError(f"precision {word!r} is not one of {PRECISION_HELP}")
    return canonical


def to_dtype(word: str | torch.dtype) -> torch.dtype:
    """The torch dtype of an explicit precision ("auto" must be resolved first)."""
    name = parse_precision(word)
    if name == "auto":
        raise ValueError("precision 'auto' has no dtype until it is resolved for a device (resolve_precision)")
    return DTYPES[name]


def hf_dtype_name(dtype: torch.dtype) -> str:
    return HF_NAMES[parse_precision(dtype)]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """auto (or None) = cuda when available, else cpu; an explicit cuda device must exist."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device; use {DEVICE_HELP}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA device; use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions: AMX tiles (Intel Sapphire Rapids and later, ~8x fp32) or
    AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake; ~3.7x fp32 on a 2048^3 matmul, 1.6-1.8x fp32 on a whole
    training step of `deepseek-v3-mini`, both measured on a 2-core Zen 4).

    `torch.backends.cpu.get_cpu_capability()` names the ATen kernel level, which is "AVX512" even on AMX
    machines in current builds, so the instruction checks are what actually answer the question.
    """
    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        return True
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(check and check()) for check in checks)


def resolve_precision(word: str | torch.dtype | None, device: torch.device, *, inference: bool = False) -> str:
    """fp32, bf16 or fp16 for `device`: "auto" (or None) chosen for the purpose, an explicit one checked."""
    precision = parse_precision(word if word is not None else "auto")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "bf16" and not bf16_ok:
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"{name} has no native bf16; use fp16 (with loss scaling when training) or fp32")
        if precision == "auto":
            return "bf16" if bf16_ok else "fp32"
        return precision
    if precision == "auto":
        # Without AMX or AVX512-BF16, CPU bf16 is emulated and slower than fp32; decode is fp32 either way.
        return "bf16" if not inference and device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return precision
