"""What wraps the model for training, applied from outside so that the model stays plain (the
pattern of torchtitan's parallelize.py): activation checkpointing, FSDP2 or DDP under torchrun,
then torch.compile."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ConfigError
from ..model import Transformer
from ..runtime import Dist
from .config import TrainConfig


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: less memory,
    about 30% more time. The wrapped blocks keep their parameter names (state dicts are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if not isinstance(model, Transformer):
        raise ConfigError("activation_checkpointing recomputes Transformer blocks; this model has none")
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def apply_fsdp(model: nn.Module) -> None:
    """FSDP2: each block's parameters, gradients and optimizer state sharded over the processes."""
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, Transformer):
        raise ConfigError("strategy=fsdp shards Transformer blocks; use ddp for this model")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def parallelize(model: nn.Module, cfg: TrainConfig, dist: Dist, device: torch.device):
    """The callable the loop trains through: `model` itself, or its DDP and/or compiled wrapper.
    FSDP and activation checkpointing change `model` in place."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dist.enabled and cfg.strategy == "fsdp":
        apply_fsdp(model)
    forward = model
    if dist.enabled and cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if cfg.compile else forward
