"""Optimizers: AdamW with weight decay on matrices only, or Muon for the hidden matrices with AdamW
for the rest; several optimizers stepped as one."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import Router
from .config import TrainConfig


class Optimizers:
    """Several optimizers stepped as one (Muon for matrices with AdamW for the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the hidden linear maps, Muon's domain: every Linear's and router's weight but
    the output head's (so neither the embeddings nor the head, which a tied head shares)."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Linear, Router)) and m is not model.lm_head and m.weight.requires_grad]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D gains); with
    optimizer=muon, Muon (torch.optim.Muon) takes the hidden matrices and AdamW the embeddings,
    the head and every 1-D parameter. Each group remembers its base lr for the schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda", "mps")  # one kernel for all parameters (5x foreach's speed on CPU)
    adamw_kw = dict(betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True)
    hidden = {id(w) for w in hidden_matrices(model)} if cfg.optimizer == "muon" else set()
    muon = [p for p in params if id(p) in hidden]
    rest = [p for p in params if id(p) not in hidden]
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr": cfg.lr},
    ], lr=cfg.lr, **adamw_kw)
    optimizers = [adamw]
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                           momentum=cfg.muon_momentum))
    for o in optimizers:
        for group in o.param_groups:
            group["base_lr"] = group["lr"]
    return adamw if len(optimizers) == 1 else Optimizers(*optimizers)
