"""LoRA (Hu et al. 2021), as peft computes it, applied to a model from outside.

    y = x W^T + b + scaling * B(A(dropout(x)))     scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

`apply_lora` replaces each targeted nn.Linear (chosen by its own name in its parent: q_proj, v_proj,
kv_up, ...) with a `LoRALinear` that shares the Linear's weight and bias, frozen, and adds A (r, in;
Kaiming-uniform, as peft) and B (out, r; zeros, so an adapted model starts equal to its base). Every
other parameter is frozen, so the optimizer only holds the adapters. State-dict names of the base
stay as they were (`blocks.0.attn.q_proj.weight`); the adapters add `...q_proj.lora_A.weight` and
`...q_proj.lora_B.weight`.

A LoRA checkpoint holds the adapters only (adapter.safetensors), with adapter.json naming the base
checkpoint and the SHA-256 of its weights: a changed base is refused by name. `merge_lora` folds the
adapters into the weights (in float32, then cast back). interop/peft.py writes and reads peft's format.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError

ADAPTER = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False  # scaling alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora_targets names no projection")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d["targets"]), rslora=bool(d.get("rslora", False)))


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update beside its frozen weight (shared with the Linear it replaces)."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, cfg.rank, **kw)
        self.lora_B = nn.Linear(cfg.rank, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()  # (p=0 would still copy x)
        self.scaling = cfg.scaling
        self.active = True  # False inside `adapters_disabled`: the base model (DPO's reference)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.active:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B A, in float32: what merging adds to the weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, as its state dict names them (without the prefix of
    activation checkpointing's wrapper, which the state dict leaves out too)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    return {name.replace(_CHECKPOINT_PREFIX, ""): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears LoRA may adapt, by module name: every one but the output head."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and m is not getattr(model, "lm_head", None)}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze the model and put LoRA on every Linear whose name in its parent is one of cfg.targets
    (in every block: attention, dense MLP, each expert and shared expert). Returns the adapted
    modules' names. A target the model does not have is refused, naming the ones it has."""
    linears = linear_layers(model)
    have = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in cfg.targets if t not in have]
    if unknown:
        raise ConfigError(f"lora_targets: this model has no {', '.join(unknown)}; its projections are "
                          f"{', '.join(have)}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, linear in linears.items():
        parent_name, _, attr = name.rpartition(".")
        if attr in cfg.targets:
            setattr(model.get_submodule(parent_name), attr, LoRALinear(linear, cfg))
            names.append(name)
    return names


def adapter_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name ({module}.lora_A.weight, {module}.lora_B.weight), on the
    CPU: the model's own, or those of `state`, its (gathered) state dict, when given."""
    names = [f"{name}.{part}.weight" for name in adapted(model) for part in ("lora_A", "lora_B")]
    state = model.state_dict() if state is None else state
    return {k: state[k].detach().cpu().contiguous() for k in names}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into the model's LoRA layers; every layer needs both of its tensors."""
    from .checkpoint import CheckpointError

    expected = adapter_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + \
               (f" unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise CheckpointError(f"{source} does not fit the model's LoRA layers: {what.strip()}")
    for name, m in adapted(model).items():
        for part in ("lora_A", "lora_B"):
            t = state[f"{name}.{part}.weight"]
            w = getattr(m, part).weight
            if t.shape != w.shape:
                raise CheckpointError(f"{source}: {name}.{part} is {tuple(t.shape)}, the model's is {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(t)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its base (the adapters are skipped), as peft's
    disable_adapter(): DPO's reference policy without a second copy of the model."""
    layers = {m: m.active for m in adapted(model).values()}
    for m in layers:
        m.active = False
    try:
        yield
    finally:
        for m, active in layers.items():  # as they were (the block may be inside another one)
            m.active = active


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scaling B A, added in float32, then cast back to W's
    dtype) and put plain Linears back: the model of a full checkpoint, in place."""
    for name, m in adapted(model).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        linear.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        if m.bias is not None:
            linear.bias.copy_(m.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- adapter checkpoints -----------------------------------------------------------------------------
def weights_sha256(folder: str | Path) -> str:
    """The SHA-256 of a checkpoint's weights file: what a LoRA checkpoint's base must still have."""
    from .checkpoint import WEIGHTS, file_sha256

    return file_sha256(Path(folder) / WEIGHTS)


def adapter_record(cfg: LoRAConfig, base: Path) -> dict:
    """adapter.json: the LoRA settings, the base checkpoint's path and the hash of its weights."""
    return {"lora": cfg.to_dict(), "base": str(Path(base).resolve()), "base_sha256": weights_sha256(base)}


def is_adapter_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, Path, dict[str, torch.Tensor]]:
    """(settings, base checkpoint folder, adapter tensors) of a LoRA checkpoint, after checking that the
    base is where it was and unchanged."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, WEIGHTS, read_json

    folder = Path(folder)
    record = read_json(folder / ADAPTER_CONFIG, "adapter config")
    try:
        cfg, base, digest = LoRAConfig.from_dict(record["lora"]), Path(record["base"]), record["base_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read adapter config {folder / ADAPTER_CONFIG}: {e}") from None
    if not (base / WEIGHTS).exists():
        raise CheckpointError(f"the LoRA checkpoint {folder} adapts {base}, which no longer exists")
    if weights_sha256(base) != digest:
        raise CheckpointError(f"the base checkpoint {base} has changed since the LoRA adapter {folder} was "
                              "trained on it (its weights' SHA-256 differs); adapters fit only their own base")
    try:
        state = load_file(str(folder / ADAPTER))
    except Exception as e:
        raise CheckpointError(f"cannot read adapter weights {folder / ADAPTER}: {str(e).splitlines()[0]}") from None
    return cfg, base, state


def save_adapter_files(folder: Path, record: dict, state: dict[str, torch.Tensor]) -> None:
    """adapter.safetensors (`state`: adapter_state) and adapter.json into a checkpoint folder being written."""
    from safetensors.torch import save_file

    save_file(state, str(folder / ADAPTER), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
