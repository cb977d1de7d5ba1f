"""Training objectives. An objective draws its kind of batch from the data and turns a batch into a
loss and the metrics it logs; the loop never asks which objective it runs.

    lm   next-token loss over every position of random windows of the token stream (pretraining)
    sft  the same loss over the tokens to learn only (the assistant's turns of conversations, the
         answers of prompt/answer pairs), of random examples (fine-tuning)

An objective that logs more than the loss names its metrics in `columns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data import TokenData, masked_batch


@dataclass
class Batch:
    """Inputs x (B, T), targets y (B, T), and where the loss counts (B, T), None meaning everywhere."""

    x: torch.Tensor
    y: torch.Tensor
    loss_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        mask = None if self.loss_mask is None else self.loss_mask.to(device)
        return Batch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True), mask)


class LanguageModeling:
    name = "lm"
    columns: tuple[str, ...] = ()

    def check(self, model, data: TokenData) -> None:
        if model.answers_only:
            raise ConfigError("the lstm-seq2seq baseline trains on prompt/answer pairs: set objective=sft")

    def batch(self, data: TokenData, split: str, generator: torch.Generator, batch_size: int,
              context_len: int, rows: slice) -> Batch:
        return Batch(*data.batch(split, batch_size, context_len, generator, rows))

    def loss(self, forward, batch: Batch, router_stats=None) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss, logged metrics) of `forward` (the model, or its DDP/compiled wrapper) on a batch."""
        return forward(batch.x, batch.y, loss_mask=batch.loss_mask, router_stats=router_stats), {}

    def full_val_loss(self, model, data: TokenData) -> float:
        """The exact loss over the whole val split: every token once, in non-overlapping windows."""
        from ..evaluation import lm_metrics

        return lm_metrics(model, data.val, batch_size=64)["loss"]


class SupervisedFineTuning(LanguageModeling):
    name = "sft"

    def check(self, model, data: TokenData) -> None:
        if not data.has_examples:
            raise ConfigError(f"objective=sft needs conversations or prompt/answer pairs: prepare {data.folder} "
                              "with --chat FORMAT or --pairs qa|dialogue")

    def batch(self, data: TokenData, split: str, generator: torch.Generator, batch_size: int,
              context_len: int, rows: slice) -> Batch:
        which = torch.randint(data.n_examples(split), (batch_size,), generator=generator)[rows].tolist()
        return Batch(*masked_batch(*data.examples(split), which, context_len))

    def full_val_loss(self, model, data: TokenData) -> float:
        """The exact loss over every token to learn of the val examples."""
        from ..evaluation import answer_metrics

        return answer_metrics(model, *data.examples("val"))["answer_loss"]


OBJECTIVES = {o.name: o for o in (LanguageModeling, SupervisedFineTuning)}
