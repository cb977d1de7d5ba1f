"""Decoding: sampling rules and the Engine that runs a model with a preallocated KV cache.

    prompt ids -> one prefill forward pass (fills the cache) -> one-position forward per new token

Decoding with the cache returns exactly the tokens that recomputing the whole sequence returns.
When the context fills up, the Engine keeps the most recent half of it, prefills that into a fresh
cache and goes on (the recompute path crops to the last context_len tokens instead).

Engine(model, compile=True) runs the one-token step through torch.compile. Its shapes never change:
the cache is static (see KVCache), sized to a power of two that holds the request, and the position
is a tensor, so one graph serves every token; the prompt's prefill runs eagerly.

`head_input_major(model)` lays the head out for batch-1 decoding on the CPU; `load` does it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .quantize import is_dynamic_int8


class GenerationError(ValueError):
    pass


GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily (dividing by it would overflow, as in vLLM)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # keep tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # HF's: a seen token's logit divided by it (multiplied, if negative)
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the reply so far
    presence_penalty: float = 0.0  # OpenAI's: minus this once the token is in the reply
    stop: tuple[str, ...] = ()  # texts that end the reply (not included); applied to the text (api.py)
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
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.01 <= self.repetition_penalty <= 100:  # beyond these the logits overflow float32
            raise GenerationError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("each stop string must be non-empty text")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class Penalties:
    """What the penalties need of the tokens so far: which ids the sequence holds (the prompt
    included, as HF's repetition penalty counts them) and how often each was generated (OpenAI's)."""

    def __init__(self, prompt: list[int], vocab_size: int, device):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(prompt, device=device)] = True
        self.counts = torch.zeros(vocab_size, device=device)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1

    def apply(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        logits = logits.float().clone()
        if params.repetition_penalty != 1.0:
            seen = logits[:, self.seen]
            p = params.repetition_penalty
            logits[:, self.seen] = torch.where(seen < 0, seen * p, seen / p)
        return logits - params.frequency_penalty * self.counts - params.presence_penalty * (self.counts > 0)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k, then top-p
    (nucleus: the smallest set of tokens whose probability reaches top_p), then min-p, then a draw.
    (Penalties, when asked for, were applied to the logits before: Penalties.apply.)"""
    if params.temperature < GREEDY_BELOW:
        return logits.max(dim=-1).indices  # the first largest, as argmax, at a third of its cost on CPU
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        drop[..., 0] = False  # (a top_p below float32's smallest number would otherwise drop it too)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seeded_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The random generator of one sequence's draws: seeded when a seed is asked for (and used)."""
    if params.seed is None or params.temperature < GREEDY_BELOW:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def choose(logits: torch.Tensor, params: SamplingParams, penalties: "Penalties | None",
           generator: torch.Generator | None) -> int:
    """One sequence's next token from its logits (1, V): penalties (when asked for), then sample."""
    if penalties is not None:
        logits = penalties.apply(logits, params)
    return int(sample(logits, params, generator)[0])


def head_input_major(model: nn.Module) -> nn.Module:
    """Store the output head's weight input-major: the same (vocab_size, C) tensor with the memory
    layout of its transpose, as channels_last is for convolutions. A decoding step multiplies one
    vector by the head, and MKL streams a head laid out this way faster: the 51M model's 50,257 x 512
    head takes 2.2 instead of 3.0 ms on our 2-core CPU (RESULTS.md). The other weights stay row-major,
    which the compiled step's own matrix-vector kernels read best (see _compiled_last_logits).
    Values, shapes and names do not change; checkpoints and exports save contiguous copies. A tied
    head is also tok_emb's weight, whose lookups then read strided rows: a few per step."""
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data.t().contiguous().t()
    return model


def _last_logits(model, idx, cache):
    return model(idx, kv_cache=cache)[:, -1, :]  # (B, V)


@functools.cache
def _compiled_last_logits():
    """One compiled function for every Engine: a model's graph, compiled at its first use, serves
    later Engines of the same model (torch.compile keeps one graph per model and cache size).
    cpp_wrapper: the graph calls its kernels from C++ rather than Python, which matters at one token
    per call. decompose_mm_pass: inductor turns each one-row product with a weight of at most 2,048
    rows and columns into its own vectorised kernel over the weight's rows, in place of an MKL call
    (13% more tokens/s on the 10M benchmark model; the larger head stays with MKL). (Made on first
    use: importing the compiler takes about a second.)"""
    return torch.compile(_last_logits, fullgraph=True, dynamic=False,
                         options={"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}})


def reusable(cached: list[int], prompt: list[int]) -> int:
    """How many of the prompt's first ids the cached ids already hold, short of its last id (which is
    prefilled in any case: its logits choose the next token)."""
    n = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        n += 1
    return n


class PrefixCache:
    """A KV cache kept from one call to the next (a chat's turns), with the ids whose keys and values
    it holds: a prompt that starts with those ids prefills only the rest (`prefilled` says how many)."""

    def __init__(self):
        self.cache = None
        self.ids: list[int] = []
        self.prefilled = 0

    def keep(self, prompt: list[int]) -> int:
        """Rewind to the longest cached prefix of `prompt` (leaving at least its last id to prefill)."""
        n = reusable(self.ids, prompt)
        self.ids = self.ids[:n]
        self.cache.rewind(n)
        return n


class Engine:
    """Generates token ids from a Transformer; works on ids only (text is the caller's business)."""

    def __init__(self, model, vocab_limit: int | None = None, compile: bool = False):
        """vocab_limit: never produce ids at or above it (a vocabulary padded past its tokenizer's).
        compile: run the one-token step through torch.compile over a static KV cache (fixed shapes,
        so one graph serves every position); the first call compiles it (seconds to a minute)."""
        self.model = model
        self.context_len = model.config.context_len
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.config.vocab_size else None
        self.static = compile
        self._step = self._forward
        if compile:
            if is_dynamic_int8(model):
                raise GenerationError("compile does not combine with int8 (FBGEMM's dynamic kernel); "
                                      "int8wo (weight-only int8) compiles")
            if model.config.n_expert:  # which tokens reach which expert decides shapes at run time
                raise GenerationError("compile supports dense models; a mixture of experts decodes eagerly")
            self._step = functools.partial(self._forward, last_logits=_compiled_last_logits())

    def _device(self):
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams, stop_ids=(),
                 use_cache: bool = True, prefix: PrefixCache | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; stop after max_tokens or at a stop id (not yielded).
        prefix: a PrefixCache kept between calls, whose cached ids this prompt need not prefill again
        (the eager path; a compiled step sizes its own cache to each call)."""
        params.validate()
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(prompt) > self.context_len:
            raise GenerationError(f"the prompt has {len(prompt)} tokens, more than the model's context "
                                  f"of {self.context_len}")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._generate(prompt, params, set() if params.ignore_eos else set(stop_ids), use_cache,
                                      prefix if use_cache and not self.static else None)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt, params, stop_ids, use_cache, prefix):
        device = self._device()
        generator = seeded_generator(params, device)
        tokens = list(prompt)
        cache = None
        if use_cache and self.static:  # attention reads the whole static buffer: size it to this call
            size = 64  # a power of two: a handful of distinct graphs serve every request
            while size < min(len(tokens) + params.max_tokens, self.context_len):
                size *= 2
            cache = self.model.new_kv_cache(1, min(size, self.context_len), static=True)
        elif use_cache and prefix is not None:  # the cache of an earlier call: only what is new is prefilled
            if prefix.cache is None or prefix.cache.k[0].device != device:
                prefix.cache, prefix.ids = self.model.new_kv_cache(1), []
            cache = prefix.cache
        elif use_cache:
            cache = self.model.new_kv_cache(1)
        start = 0
        if prefix is not None:
            start = prefix.keep(tokens)
            prefix.prefilled = len(tokens) - start
            prefix.ids += tokens[start:]
        logits = self._forward(self._ids(tokens[start:], device), cache)  # the prompt, in one pass
        cached = len(tokens)
        penalties = Penalties(tokens, logits.size(-1), device) if params.penalized else None
        for _ in range(params.max_tokens):
            next_id = choose(logits, params, penalties, generator)
            if next_id in stop_ids:
                return
            yield next_id
            tokens.append(next_id)
            if penalties is not None:
                penalties.add(next_id)
            if cache is None:
                logits = self._forward(self._ids(tokens[-self.context_len:], device), None)
            elif cached >= self.context_len:  # full: keep the recent half and prefill it afresh
                cache.reset()
                cached = self.context_len // 2
                logits = self._forward(self._ids(tokens[-cached:], device), cache)
                if prefix is not None:
                    prefix.ids = tokens[-cached:]
            else:
                cached += 1
                logits = self._step(self._ids([next_id], device), cache)
                if prefix is not None:
                    prefix.ids.append(next_id)

    @staticmethod
    def _ids(ids, device):
        return torch.tensor([ids], dtype=torch.long, device=device)

    def _forward(self, idx, cache, last_logits=_last_logits):
        logits = last_logits(self.model, idx, cache)
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        return logits
