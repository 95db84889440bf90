"""int8 inference on the CPU: dynamic quantization of the linear layers.

Every `nn.Linear` (attention projections, MLPs, the ITC / ITM heads and the 30,524-way LM head)
keeps int8 weights (per output channel) and quantizes its input per batch at run time
(`torch.ao.quantization.quantize_dynamic`, fbgemm / x86 kernels); LayerNorms, softmaxes,
embeddings and the patch convolution stay float32. Tied modules (BLIP's decoder shares the
encoder's cross-attention and MLPs) are converted once per place they appear. The accuracy cost
is measured on the demo's trained models (docs/benchmarks.md); outputs are not bit-equal to
float32 and an index built with one is searched with the other only approximately.

torch 2.14 still ships `torch.ao.quantization` but marks it deprecated (its warnings are
silenced here); when it goes, torchao's int8 dynamic-activation config is the replacement.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE = ("int8",)


def quantize_model(model: nn.Module, kind: str, device: torch.device, dtype: torch.dtype):
    """`model` with int8 dynamic linear layers (a new module; the float one is left as is)."""
    if kind not in QUANTIZE:
        raise ValueError(f"quantize={kind!r}: expected one of {QUANTIZE}")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"quantize=int8 runs float32 models on the CPU (got device {device}, dtype {dtype})"
        )
    # per-channel weights: each output row its own scale
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch marks torch.ao.quantization as deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
