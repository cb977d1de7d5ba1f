"""Int8 weights for CPU decoding, two ways.

Batch-1 decoding reads every weight once per token, so it runs at the speed of memory, not of
arithmetic; int8 weights are a quarter of float32's bytes. Both kinds store each Linear's weight as
int8 with one scale per output row (symmetric, per channel).

- "int8" (`quantize_int8`): the products run in FBGEMM's dynamic int8 kernel, which also rounds its
  input to int8, with one scale per call computed at run time (weight-and-activation int8). Fast
  in eager mode; not compilable. A row's output depends slightly on the rows that share its call,
  so a prefill and token-by-token decoding agree only to rounding.
- "int8wo" (`quantize_int8_weight_only`, weight-only): activations stay float; `Int8Linear` writes
  a one-row product as multiply-and-sum, which the compiled decoding step (`--compile`) turns into
  one kernel that converts the int8 weight as it reads it (on an AVX2 CPU, four weights to a 32-bit
  word). The fastest decoding on our AVX-512 CPU (RESULTS.md); without compiling, each product
  first converts the whole weight, which is slow.

Embeddings, norms and routers stay in float32; "int8wo" also quantizes a tied head (a copy: the
embedding keeps its float table). Rounding costs some accuracy: `samovar eval RUN --quantize KIND`
measures the perplexity cost on your data, and benchmarks/int8.py prints it beside the speed.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import cpu_vectors_are_avx2

QUANTIZATIONS = ("int8", "int8wo")


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
        quantized = torch.ao.quantization.quantize_dynamic(_plain_linears(copy.deepcopy(model).eval()),
                                                           {nn.Linear: qconfig}, dtype=torch.qint8)
    return quantized


def _plain_linears(model: nn.Module) -> nn.Module:
    """The model with each layers.Linear made an nn.Linear of the same parameters, the one class
    torch.ao's dynamic quantization converts."""
    def plain(linear: nn.Linear) -> nn.Linear:
        if type(linear) is nn.Linear:
            return linear
        made = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        made.weight, made.bias = linear.weight, linear.bias
        return made

    return _each_linear(model, plain)


def _each_linear(model: nn.Module, make) -> nn.Module:
    """The model with each of its nn.Linear layers (the head too) replaced by make(layer)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
    return model


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times one float scale per row (weight-only int8).

    On an AVX2 CPU the int8 weights of a row are kept four to a 32-bit word (`words`): inductor
    loads vectors of 8-bit integers there a few bytes at a time through a buffer, which made a
    compiled decoding step 6-8x slower than float32's, where a vector of 32-bit words loads whole.
    Word i of a row holds its columns i, i + n, i + 2n and i + 3n (n = in_features / 4, the row
    padded with zeros to a multiple of 4), so that each byte meets a run of the input.
    """

    def __init__(self, linear: nn.Linear, words: bool | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # the largest weight of a row -> 127
        w = torch.round(w / scale[:, None]).to(torch.int8)
        self.words = cpu_vectors_are_avx2() if words is None else words
        self.register_buffer("weight", _to_words(w) if self.words else w.contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        if x.shape[:-1].numel() > 1:  # a prompt: convert the weight, then one product
            y = F.linear(x, self.int8_weight().to(x.dtype))
        elif self.words:  # a decoding step, compiled: one pass over the words, each byte taken out by shifts
            x = F.pad(x, (0, self.weight.shape[1] - self.in_features)).unflatten(-1, (4, -1))
            words = self.weight.view(torch.float32).view(torch.int32)  # read as float32: whole vector loads
            y = sum((x[..., j, None, :] * ((words << (24 - 8 * j)) >> 24).to(x.dtype)).sum(-1) for j in range(4))
        else:  # a decoding step, compiled: one pass over the int8 weight
            y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1)
        y = y * self.scale
        return y if self.bias is None else y + self.bias

    def int8_weight(self) -> torch.Tensor:
        """W as int8, rows by columns (out_features x in_features)."""
        if not self.words:
            return self.weight
        rows = self.weight.shape[0]
        return self.weight.view(rows, -1, 4).transpose(1, 2).reshape(rows, -1)[:, :self.in_features]


def _to_words(w: torch.Tensor) -> torch.Tensor:
    """Int8 rows laid out four to a little-endian 32-bit word: word i holds columns i, i + n, i + 2n,
    i + 3n (n = a quarter of the columns, after padding with zeros to a multiple of 4)."""
    w = F.pad(w, (0, -w.shape[1] % 4))
    rows = w.shape[0]
    return w.view(rows, 4, -1).transpose(1, 2).contiguous().view(rows, -1)


def quantize_int8_weight_only(model: nn.Module, words: bool | None = None) -> nn.Module:
    """A copy of `model` whose Linear layers (the head too) are Int8Linear; for inference. words:
    the weights four to a 32-bit word (None: on an AVX2 CPU, see Int8Linear)."""
    return _each_linear(copy.deepcopy(model).eval(), lambda linear: Int8Linear(linear, words))


def is_quantized(model: nn.Module) -> bool:
    return is_dynamic_int8(model) or any(isinstance(m, Int8Linear) for m in model.modules())


def is_dynamic_int8(model: nn.Module) -> bool:
    """Quantized for FBGEMM's dynamic kernel ("int8"), which torch.compile cannot trace."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def quantize(model: nn.Module, kind: str | None) -> nn.Module:
    if kind is None:
        return model
    if kind not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {kind!r}; choose from {', '.join(QUANTIZATIONS)}")
    return quantize_int8(model) if kind == "int8" else quantize_int8_weight_only(model)
