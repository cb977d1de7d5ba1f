"""Where and how to compute: device and dtype choice, autocast, seeding, rank-0 printing."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class RuntimeConfigError(ValueError):
    pass


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RuntimeConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError("device cuda was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeConfigError("device mps was asked for, but MPS is not available")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32. fp32 is the CPU default: on CPUs
    without native bf16 (AVX2 only) bf16 matmuls run about 100x slower than fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise RuntimeConfigError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn("bf16 on a CPU without native bf16 support runs far slower than fp32", stacklevel=2)
    if device.type == "cpu" and dtype == torch.float16:
        raise RuntimeConfigError("fp16 is for GPUs; use fp32 (or bf16) on the CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for training: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)


def eprint(*args) -> None:
    print(*args, file=sys.stderr)
