"""Training objectives. An objective draws its kind of batch from the data and turns a batch into a
loss and the metrics it logs; the loop never asks which objective it runs.

    lm   next-token loss over every position of random windows of the token stream (pretraining)
    sft  the same loss over the tokens to learn only (the assistant's turns of conversations, the
         answers of prompt/answer pairs), of random examples (fine-tuning), packed several a row
         (pack=true: a block-diagonal attention mask keeps them apart) or one a row, padded
    dpo  preference pairs (data/preference.py): the policy's log-probability of the chosen answer
         over the rejected one, measured against a frozen reference (Rafailov et al. 2023; IPO, hinge)

An objective that logs more than the loss names its metrics in `columns`. `start` is called once the
model holds its starting weights (and adapters), before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import TokenData, masked_batch, packed_batch
from .config import TrainConfig


@dataclass
class Batch:
    """Inputs x (B, T), targets y (B, T) (-100 on padding), where the loss counts (B, T) (None:
    everywhere), and, for packed rows, which document each position belongs to (B, T). A DPO batch
    holds its pairs' chosen rows, then their rejected rows, `pairs` of each, and the reference's
    log-probabilities of the rows (2 * pairs,) when they were computed up front."""

    x: torch.Tensor
    y: torch.Tensor
    loss_mask: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    pairs: int | None = None
    reference: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.x), move(self.y), move(self.loss_mask), move(self.documents), self.pairs,
                     move(self.reference))

    @property
    def tokens(self) -> int:
        """Real tokens (padding is not counted)."""
        return int((self.y != -100).sum())

    @property
    def scored(self) -> int:
        """What the loss averages over: positions, or a DPO batch's pairs."""
        if self.pairs is not None:
            return self.pairs
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

    def start(self, model, data: TokenData, reference: str | Path | None, device, dtype) -> None:
        """Called once the model holds its starting weights: `reference` is the checkpoint it started
        from (--init-from), if any."""

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
        if data.meta["examples"].get("kind") == "preference":
            raise ConfigError(f"{data.folder} holds preference pairs: train on them with objective=dpo")
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


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
             rejected_tokens=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected
    answers, from their summed log-probabilities (B,) under the policy and the reference.

        h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
        sigmoid  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (DPO; e > 0: conservative DPO)
        hinge    max(0, 1 - beta h)                                     (SLiC)
        ipo      (h' - 1 / (2 beta))^2, h' from log-ratios averaged over each answer's tokens (IPO, as TRL)
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    elif kind == "ipo":
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo_loss must be sigmoid, ipo or hinge, got {kind!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its targets where mask is true, and how many there are."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logps * mask).sum(-1), mask.sum(-1)


class DirectPreference(LanguageModeling):
    """DPO: for pairs of a chosen and a rejected answer to one prompt, raise the policy's log-ratio
    to the reference of the chosen answer over the rejected one's (dpo_loss). The reference is the
    starting model, frozen: in a LoRA run the model itself with its adapters switched off (no second
    copy), else a copy loaded from --init-from. With precompute_ref its log-probabilities of every
    example are computed once up front and kept beside the data (reference-*.safetensors)."""

    name = "dpo"
    columns = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")

    def __init__(self, cfg: TrainConfig | None = None):
        super().__init__(cfg)
        self.reference_model = None  # the model to compute the reference with (None: precomputed)
        self.precomputed: dict[str, torch.Tensor] = {}  # split -> reference log-probs of each example

    def check(self, model, data: TokenData) -> None:
        super().check(model, data)
        if not data.has_examples or data.meta["examples"].get("kind") != "preference":
            raise ConfigError(f"objective=dpo needs preference pairs: prepare {data.folder} with --preference "
                              "(JSONL of prompt, chosen, rejected)")

    def start(self, model, data: TokenData, reference: str | Path | None, device, dtype) -> None:
        from ..checkpoint import resolve_checkpoint
        from ..lora import adapted
        from ..model import build_model
        from .state import init_from

        if reference is None:
            raise ConfigError("objective=dpo needs a starting model to measure against: give --init-from RUN "
                              "(the chat model)")
        source = resolve_checkpoint(reference)
        if adapted(model):
            self.reference_model = model  # its base: run with adapters_disabled
        else:
            self.reference_model = build_model(model.config).to(device)
            init_from(source, self.reference_model, data.tokenizer(), device)  # as the model started
            self.reference_model.requires_grad_(False)
        if self.cfg.precompute_ref:
            self.precomputed = self._precompute(data, source, device, dtype)
            if self.reference_model is not model:
                self.reference_model = None  # no longer needed: free its memory

    def _precompute(self, data: TokenData, source: Path, device, dtype) -> dict[str, torch.Tensor]:
        """The reference's log-prob of every example of both splits, read from beside the data when
        computed before for the same reference weights and context, else computed and saved there."""
        from safetensors.torch import load_file, save_file

        from ..checkpoint import WEIGHTS, atomic_path
        from ..lora import weights_sha256
        from ..runtime import autocast

        context = self.reference_model.config.context_len
        file = None
        if (source / WEIGHTS).exists():  # (the weights of a LoRA checkpoint are not one file: not kept)
            file = data.folder / f"reference-{weights_sha256(source)[:16]}-ctx{context}.safetensors"
        if file is not None and file.exists():
            saved = load_file(str(file))
            if all(s in saved and len(saved[s]) == data.n_examples(s) for s in ("train", "val")):
                return saved
        out = {}
        for split in ("train", "val"):
            n, parts = data.n_examples(split), []
            for start in range(0, n, 32):
                x, y, mask = masked_batch(*data.examples(split), range(start, min(start + 32, n)), context)
                with autocast(device, dtype):
                    parts.append(self._reference_logps(Batch(x, y, mask).to(device)).float().cpu())
            out[split] = torch.cat(parts)
        if file is not None:
            with atomic_path(file) as tmp:
                save_file(out, str(tmp))
        return out

    @torch.no_grad()
    def _reference_logps(self, batch: Batch) -> torch.Tensor:
        from ..lora import adapters_disabled

        model = self.reference_model
        was_training = model.training
        model.eval()  # no dropout in the reference
        try:
            with adapters_disabled(model):
                return sequence_logps(model(batch.x), batch.y, batch.loss_mask)[0]
        finally:
            model.train(was_training)

    def batch(self, data: TokenData, split: str, generator: torch.Generator, batch_size: int,
              context_len: int, rows: slice) -> Batch:
        pairs = torch.randint(data.n_examples(split) // 2, (batch_size,), generator=generator)[rows]
        return self._pairs(data, split, pairs, context_len)

    def _pairs(self, data: TokenData, split: str, pairs: torch.Tensor, context_len: int) -> Batch:
        """The batch of these pairs: their chosen rows, then their rejected rows (examples 2i, 2i + 1)."""
        which = torch.cat([2 * pairs, 2 * pairs + 1]).tolist()
        x, y, mask = masked_batch(*data.examples(split), which, context_len)
        reference = self.precomputed[split][which] if self.precomputed else None
        return Batch(x, y, mask, pairs=len(pairs), reference=reference)

    def loss(self, forward, batch: Batch, router_stats=None) -> tuple[torch.Tensor, dict[str, float]]:
        logps, tokens = sequence_logps(forward(batch.x), batch.y, batch.loss_mask)
        reference = batch.reference
        if reference is None:
            reference = self._reference_logps(batch)
        n = batch.pairs
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], reference[:n].to(logps.dtype),
                                            reference[n:].to(logps.dtype), self.cfg.dpo_beta, self.cfg.dpo_loss,
                                            self.cfg.label_smoothing, tokens[:n], tokens[n:])
        metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                   "rewards/accuracies": (chosen > rejected).float().mean().item(),
                   "rewards/margins": (chosen - rejected).mean().item()}
        return losses.mean(), metrics

    def full_val_loss(self, model, data: TokenData) -> float:
        """The mean loss over every val pair."""
        n = data.n_examples("val") // 2
        device = next(model.parameters()).device
        total = 0.0
        for start in range(0, n, 16):
            batch = self._pairs(data, "val", torch.arange(start, min(start + 16, n)), model.config.context_len)
            total += self.loss(model, batch.to(device))[0].item() * batch.pairs
        return total / n


OBJECTIVES = {o.name: o for o in (LanguageModeling, SupervisedFineTuning, DirectPreference)}
