"""Training objectives. An objective draws its kind of batch from the data and turns a batch into a
loss and the metrics it logs; the loop never asks which objective it runs.

    lm   next-token loss over every position of random windows of the token stream (pretraining)
    sft  the same loss over the tokens to learn only (the assistant's turns of conversations, the
         answers of prompt/answer pairs), of random examples (fine-tuning), packed several a row
         (pack=true: a block-diagonal attention mask keeps them apart) or one a row, padded

An objective that logs more than the loss names its metrics in `columns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data import TokenData, masked_batch, packed_batch
from .config import TrainConfig


@dataclass
class Batch:
    """Inputs x (B, T), targets y (B, T) (-100 on padding), where the loss counts (B, T) (None:
    everywhere), and, for packed rows, which document each position belongs to (B, T)."""

    x: torch.Tensor
    y: torch.Tensor
    loss_mask: torch.Tensor | None = None
    documents: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.x), move(self.y), move(self.loss_mask), move(self.documents))

    @property
    def tokens(self) -> int:
        """Real tokens (padding is not counted)."""
        return int((self.y != -100).sum())

    @property
    def scored(self) -> int:
        """Positions the loss averages over."""
        real = self.y != -100
        return int((real if self.loss_mask is None else real & self.loss_mask.bool()).sum())


class LanguageModeling:
    name = "lm"
    columns: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig | None = None):
        self.cfg = cfg or TrainConfig()

    def check(self, model, data: TokenData) -> None:
        if model.answers_only:
            raise ConfigError("the lstm-seq2seq baseline trains on prompt/answer pairs: set objective=sft")

    def note(self, data: TokenData, context_len: int) -> str | None:
        """What the user should know of how the data meets the model, or None."""
        return None

    def batch(self, data: TokenData, split: str, generator: torch.Generator, batch_size: int,
              context_len: int, rows: slice) -> Batch:
        return Batch(*data.batch(split, batch_size, context_len, generator, rows))

    def loss(self, forward, batch: Batch, router_stats=None) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss, logged metrics) of `forward` (the model, or its DDP/compiled wrapper) on a batch."""
        return forward(batch.x, batch.y, loss_mask=batch.loss_mask, router_stats=router_stats,
                       documents=batch.documents), {}

    def full_val_loss(self, model, data: TokenData) -> float:
        """The exact loss over the whole val split: every token once, in non-overlapping windows."""
        from ..evaluation import lm_metrics

        return lm_metrics(model, data.val, batch_size=64)["loss"]


class SupervisedFineTuning(LanguageModeling):
    name = "sft"

    def __init__(self, cfg: TrainConfig | None = None):
        super().__init__(cfg)
        self.pack = self.cfg.pack

    def check(self, model, data: TokenData) -> None:
        if not data.has_examples:
            raise ConfigError(f"objective=sft needs conversations or prompt/answer pairs: prepare {data.folder} "
                              "with --chat FORMAT or --pairs qa|dialogue")
        if model.answers_only:
            self.pack = False  # the LSTM baseline reads one prompt a row

    def note(self, data: TokenData, context_len: int) -> str | None:
        index = data.examples("train")[2]
        long = int(((index[:, 1] - index[:, 0]) > context_len + 1).sum())
        if not long:
            return None
        return (f"{long:,} of {len(index):,} training examples are longer than the context of {context_len} tokens: "
                "each is cut at the end of its last reply that fits (a reply longer than the context, within it)")

    def batch(self, data: TokenData, split: str, generator: torch.Generator, batch_size: int,
              context_len: int, rows: slice) -> Batch:
        n = data.n_examples(split)
        if self.pack:  # several examples a row, kept apart by their documents

            def draw() -> int:
                return int(torch.randint(n, (1,), generator=generator))

            x, y, mask, documents = packed_batch(*data.examples(split), draw, batch_size, context_len)
            return Batch(x[rows], y[rows], mask[rows], documents[rows])
        which = torch.randint(n, (batch_size,), generator=generator)[rows].tolist()
        return Batch(*masked_batch(*data.examples(split), which, context_len))

    def full_val_loss(self, model, data: TokenData) -> float:
        """The exact loss over every token to learn of the val examples."""
        from ..evaluation import answer_metrics

        return answer_metrics(model, *data.examples("val"))["answer_loss"]


OBJECTIVES = {o.name: o for o in (LanguageModeling, SupervisedFineTuning)}
