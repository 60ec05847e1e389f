"""Which float format to train in, the autocast context for it, and the fp16 loss scaler.

Params and optimizer state stay fp32 in every mode; autocast runs matmuls in the low-precision
format and keeps reductions (softmax, norms, the loss) in fp32.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into fp32/bf16 for this device; check an explicit choice is usable here."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}.")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "bf16" and not bf16_ok:
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"{name} has no native bf16; use --precision fp16 (with loss scaling) or fp32.")
        if precision == "auto":
            return "bf16" if bf16_ok else "fp32"
        return precision
    if precision == "auto":
        # Without AMX or AVX512-BF16, CPU bf16 is emulated and slower than fp32.
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling, on for fp16 only (bf16 has fp32's exponent range and needs none).

    fp16 gradients underflow below ~6e-8, so the loss is multiplied by `scale` before backward and
    the grads divided by it before the step. If any grad came out inf/nan the step is skipped and
    the scale halved; after 2000 clean steps in a row it doubles again. torch.amp.GradScaler does
    exactly this on CPU as well as CUDA (tested in tests/test_train.py), so we use it rather than a
    copy. Disabled, every method is a pass-through, so the loop has one code path.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
