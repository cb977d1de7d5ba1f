"""TrainConfig: every setting of a training run, as typed fields (settable with --set)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check_choices, from_known_fields
from ..lora import LoRAConfig


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message is one line for the user."""


@dataclass
class TrainConfig:
    batch_size: int = 12
    grad_accum: int = 1  # micro-batches per optimizer step; the step sees batch_size * grad_accum rows
    max_steps: int = 2000
    max_seconds: float | None = None  # training seconds of the whole run (a resume adds to the earlier
    # sessions' time); the schedule then follows the clock
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    warmup_frac: float = 0.05  # under max_seconds, warmup ends by this share of the budget at the latest
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: hold lr, then decay over cooldown_frac
    cooldown_frac: float = 0.3  # wsd: the final share of the run spent decaying lr linearly to min_lr
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the hidden matrices, AdamW for the rest
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_steps: int = 20  # batches per split for each loss estimate
    checkpoint_interval: int | None = None  # None: every eval_interval
    keep_last: int = 2  # checkpoints kept besides the best one
    log_interval: int = 10
    early_stop_patience: int | None = None  # stop after this many evaluations without a better val loss
    early_stop_gap: float | None = None  # stop when val loss - train loss exceeds this
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU (bf16 there: ~100x slower without native support)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more time
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate, or FSDP2 (shard parameters and state)
    peak_flops: float | None = None  # for MFU; None: measured with a matmul at start-up; 0: no MFU
    full_val_eval: bool = False  # val loss over the whole val split (exact), not eval_steps batches
    objective: Literal["lm", "sft", "dpo"] = "lm"  # lm: next token everywhere; sft: only the assistant's turns /
    # answers; dpo: preference pairs (prepare --preference), away from the rejected answers (objectives.py)
    pack: bool = True  # sft: several examples a row (kept apart by the attention mask), not one a row, padded
    dpo_beta: float = 0.1  # dpo: how far the policy may move from the reference (the KL penalty's inverse weight)
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO (Rafailov 2023), IPO (Azar 2023), SLiC's hinge
    label_smoothing: float = 0.0  # dpo sigmoid: the assumed share of flipped preference labels (conservative DPO)
    precompute_ref: bool = False  # dpo: the reference's log-probs computed once up front, kept with the data
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets, every other weight frozen
    lora_alpha: float = 16.0  # the adapters' scaling is lora_alpha / lora_rank (/ sqrt(lora_rank) with use_rslora)
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"  # samovar's projection names, comma-separated: q_proj, k_proj, v_proj,
    # out_proj, gate_proj, up_proj, down_proj; latent attention's q_down, q_up, kv_down, kv_up
    use_rslora: bool = False
    plot: bool = True  # draw loss.png at the end

    def __post_init__(self):
        check_choices(self, lambda name, value, allowed: f"{name} must be {' or '.join(allowed)}, got {value!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("cooldown_frac", "warmup_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be positive, got {self.dpo_beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        self.lora()  # the LoRA settings are checked too

    def lora(self) -> LoRAConfig | None:
        """The LoRA settings, or None when the whole model trains (lora_rank=0)."""
        if not self.lora_rank:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets, self.use_rslora)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_known_fields(cls, d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
