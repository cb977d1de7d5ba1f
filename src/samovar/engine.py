"""Decoding: sampling rules and the Engine that runs a model with a preallocated KV cache.

    prompt ids -> one prefill forward pass (fills the cache) -> one-position forward per new token

Decoding with the cache returns exactly the tokens that recomputing the whole sequence returns.
When the context fills up, the Engine keeps the most recent half of it, prefills that into a fresh
cache and goes on (the recompute path crops to the last context_len tokens instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


class GenerationError(ValueError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k, then top-p
    (nucleus: the smallest set of tokens whose probability reaches top_p), then a draw."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """Generates token ids from a Transformer; works on ids only (text is the caller's business)."""

    def __init__(self, model, vocab_limit: int | None = None):
        """vocab_limit: never produce ids at or above it (a vocabulary padded past its tokenizer's)."""
        self.model = model
        self.context_len = model.config.context_len
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.config.vocab_size else None

    def _device(self):
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams, stop_ids=(),
                 use_cache: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time; stop after max_tokens or at a stop id (not yielded)."""
        params.validate()
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(prompt) > self.context_len:
            raise GenerationError(f"the prompt has {len(prompt)} tokens, more than the model's context "
                                  f"of {self.context_len}")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._generate(prompt, params, set() if params.ignore_eos else set(stop_ids), use_cache)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt, params, stop_ids, use_cache):
        device = self._device()
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        tokens = list(prompt)
        cache = self.model.new_kv_cache(1) if use_cache else None
        logits = self._forward(tokens, cache, device)
        for _ in range(params.max_tokens):
            next_id = int(sample(logits, params, generator)[0])
            if next_id in stop_ids:
                return
            yield next_id
            tokens.append(next_id)
            if cache is None:
                logits = self._forward(tokens[-self.context_len:], None, device)
            elif cache.pos >= self.context_len:  # full: keep the recent half and prefill it afresh
                cache.reset()
                logits = self._forward(tokens[-(self.context_len // 2):], cache, device)
            else:
                logits = self._forward([next_id], cache, device)

    def _forward(self, ids, cache, device):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        logits = self.model(idx, kv_cache=cache)[:, -1, :]  # (1, V)
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        return logits
