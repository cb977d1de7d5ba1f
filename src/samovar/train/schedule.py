"""The learning-rate schedule: linear warmup, then cosine decay or warmup-stable-decay (wsd), over
the run's steps, or over its wall-clock budget when max_seconds is set."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
    """The lr of optimizer step `step` (0-based) after `elapsed` training seconds: linear warmup, then,
    as progress goes 0 -> 1, either cosine decay from lr to min_lr, or (wsd: warmup-stable-decay) lr
    held until the last cooldown_frac, then a linear decay to min_lr."""
    warm = warmup(cfg, step, elapsed)
    if warm < 1.0:
        return cfg.lr * warm
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    p = min(max(progress(cfg, step, elapsed), 0.0), 1.0)
    if cfg.schedule == "wsd":
        into_cooldown = (p - (1.0 - cfg.cooldown_frac)) / max(cfg.cooldown_frac, 1e-9)
        return cfg.lr - min(max(into_cooldown, 0.0), 1.0) * (cfg.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (cfg.lr - min_lr)


def warmup(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far through warmup the run is, 0 -> 1: by steps, or, under a max_seconds budget, by the
    clock when that is further along (so warmup takes at most warmup_frac of the budget)."""
    if cfg.warmup_steps == 0:
        return 1.0
    by_steps = (step + 1) / cfg.warmup_steps
    if cfg.max_seconds is not None:
        by_time = elapsed / (cfg.warmup_frac * cfg.max_seconds) if cfg.warmup_frac > 0 else 1.0
        by_steps = max(by_steps, by_time)
    return min(by_steps, 1.0)


def progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far past warmup the run is, 0 -> 1: by steps, or by elapsed seconds when that is further
    along under a max_seconds budget."""
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds is None:
        return by_steps
    return max(by_steps, elapsed / cfg.max_seconds)


def set_lr(optimizer, cfg: TrainConfig, lr: float) -> None:
    """Scale every parameter group's own base lr (AdamW's and Muon's differ) by lr / cfg.lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr / cfg.lr
