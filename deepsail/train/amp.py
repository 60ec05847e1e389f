"""Mixed precision for training: the autocast context for a precision, and the fp16 loss scaler.

Params and optimizer state stay fp32 in every mode; autocast runs matmuls in the low-precision format and keeps
reductions (softmax, norms, the loss) in fp32. Which precision "auto" means is `deepsail.precision`'s call.
"""

from __future__ import annotations

import contextlib

import torch

from deepsail.precision import DTYPES


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
