"""Int8 weights for CPU decoding.

Batch-1 decoding reads every weight once per token, so it runs at the speed of memory, not of
arithmetic. `quantize_int8` stores each Linear's weight as int8 with one scale per output row
(symmetric, per channel): a quarter of float32's bytes. The products run in FBGEMM's dynamic int8
kernel, which also rounds its input to int8, with one scale per call computed at run time. So this
is weight-and-activation int8: PyTorch's weight-only int8 kernel was slower than float32 on the
CPUs we measured (benchmarks/RESULTS.md). One consequence: a row's output depends slightly on the
rows that share its call, so a prefill and token-by-token decoding agree only to rounding.
Embeddings, norms and routers stay in float32.

Rounding costs some accuracy: `samovar eval RUN --quantize int8` measures the perplexity cost on
your data, and benchmarks/int8.py prints it beside the speed.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

QUANTIZATIONS = ("int8",)


class QuantizationError(ValueError):
    pass


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (float32, on the CPU) whose Linear layers hold int8 weights; for inference."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise QuantizationError(f"int8 quantization runs on the CPU in float32; the model is {p.dtype} on {p.device}")
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; its FBGEMM kernels are still core PyTorch
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: qconfig},
                                                           dtype=torch.qint8)
    return quantized


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def quantize(model: nn.Module, kind: str | None) -> nn.Module:
    if kind is None:
        return model
    if kind not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {kind!r}; choose from {', '.join(QUANTIZATIONS)}")
    return quantize_int8(model)
