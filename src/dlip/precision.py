"""Numeric precision: which dtype the forwards autocast to, and float32 loss math.

`precision` is one of "auto" (bf16 on CUDA, float32 on CPU), "fp32", "bf16" (autocast on CPU or
GPU; no loss scaling needed) and "fp16" (autocast; training then needs a gradient scaler, for
GPUs without bf16 such as V100 and T4). Weights and optimizer state stay float32 in every case.

Loss math runs in float32 whatever the forward used (`float32_math`): CPU autocast keeps
softmax, log-softmax and layer norm in the low dtype and casts every matmul down, so ITC
similarities, softmaxes and KL divergences computed under it would lose the precision the
losses need. `using(precision)` sets the precision of a block (evaluation reads it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_current: ContextVar[str] = ContextVar("dlip_precision", default="auto")


def autocast_dtype(device: torch.device, precision: str | None = None) -> torch.dtype | None:
    """The autocast dtype of `precision` (default: the current one) on `device`; None = fp32."""
    p = precision or _current.get()
    if p not in PRECISIONS:
        raise ValueError(f"precision {p!r}: use one of {list(PRECISIONS)}")
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _DTYPES[p]


def autocast(
    device: torch.device, precision: str | None = None
) -> contextlib.AbstractContextManager:
    """`torch.autocast` at `precision` on `device`, or a no-op for float32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def using(precision: str) -> Iterator[None]:
    """Make `precision` the default of `autocast` / `autocast_dtype` within the block."""
    autocast_dtype(torch.device("cpu"), precision)  # validates the name
    token = _current.set(precision)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def float32_math() -> Iterator[None]:
    """Turn off every active autocast within the block (inputs are cast by the caller)."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def gradient_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 have float32's exponent range)."""
    enabled = autocast_dtype(device, precision) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)
