"""Where and how to compute: device and dtype choice, autocast, seeding, torchrun process groups."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
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
    """Whether the CPU multiplies bf16 natively (avx512_bf16, or AMX's amx_bf16)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_vectors_are_avx2() -> bool:
    """Whether this is an x86 CPU without AVX-512: the widest vectors torch's kernels, and inductor's
    generated code, use here are AVX2's (torch's CPU capability)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def resolve_dtype(name: str, device: torch.device, bf16_on_cpu: bool = True) -> torch.dtype:
    """`auto`: bf16 on a CUDA GPU that supports it, and on a CPU with native bf16 (avx512_bf16 or
    AMX in /proc/cpuinfo), where decoding measured faster than fp32 at +0.01% perplexity
    (benchmarks/RESULTS.md); fp32 on other CPUs (AVX2 only: bf16 is emulated there, and a forward
    pass over prompts measured 4.3x slower than fp32's) and where the caller passes
    bf16_on_cpu=False: training (bf16 autocast cost +0.53% perplexity at equal steps, over the 0.5%
    auto allows), continuous batching (rounding would make a sequence's tokens depend on its
    batch), int8 models and the LSTM baseline (not measured).
    The SAMOVAR_DTYPE environment variable, when set, is what `auto` means (the test suite sets
    fp32, so that its figures do not depend on the CPU)."""
    if name == "auto" and os.environ.get("SAMOVAR_DTYPE"):
        name = os.environ["SAMOVAR_DTYPE"]
        if name not in DTYPES and name != "auto":
            raise RuntimeConfigError(f"SAMOVAR_DTYPE={name!r} is not a dtype; use auto, fp32, bf16 or fp16")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and bf16_on_cpu and cpu_has_native_bf16():
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


# ---- distributed (torchrun) --------------------------------------------------------------------------
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float], device) -> list[float]:
        """The mean over ranks of each value (identity for one process)."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()

    def any(self, flag: bool, device) -> bool:
        """True on every rank when it is true on some rank (so that all ranks stop together)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1: nccl on CUDA (one GPU per local rank),
    gloo on the CPU. Without torchrun, one process on `device_name`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # destroyed before the interpreter tears down, as PyTorch asks (its threads outliving it can abort)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Dist(rank, local, world), device
