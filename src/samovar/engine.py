"""Decoding: sampling rules and the Engine that runs a model with a preallocated KV cache.

    prompt ids -> one prefill forward pass (fills the cache) -> one-position forward per new token

Decoding with the cache returns exactly the tokens that recomputing the whole sequence returns.
When the context fills up, the Engine keeps the most recent half of it, prefills that into a fresh
cache and goes on (the recompute path crops to the last context_len tokens instead).

The cache is a SlotCache of one row, as in continuous batching (serve/scheduler.py), whose
decoding step is the same. Compiled, it runs as one program whatever the length attended to, so
that it serves every token of every request (the prompt's prefill runs eagerly):
Scheduler(model, compile=True) through torch.compile's graphs (`compiled_step`: one for a single
row, one for any number of rows), Engine(model, compile=True) on the CPU through the step compiled
ahead of time (`AheadOfTimeStep`: no guard check per call, 1.1-1.5x the tokens/s).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .kv_cache import SlotCache, SlotRows
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
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit, in [-100, 100]

    def validate(self, vocab_size: int | None = None) -> None:
        """A GenerationError for the first setting out of range (token ids: of a vocabulary this large)."""
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
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 64:  # what torch.Generator takes
            raise GenerationError(f"seed must be a 64-bit integer, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("each stop string must be non-empty text")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0 or vocab_size is not None and token >= vocab_size:
                raise GenerationError(f"logit_bias: {token!r} is not a token id" +
                                      (f" of a vocabulary of {vocab_size}" if vocab_size is not None else ""))
            if not -100 <= bias <= 100:
                raise GenerationError(f"logit_bias: token {token}'s bias must be in [-100, 100], got {bias!r}")

    @property
    def penalized(self) -> bool:
        """Whether the logits are adjusted before sampling: a penalty or a logit bias (Penalties)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))


class Penalties:
    """What a sequence's logits are adjusted by before sampling: OpenAI's logit bias, a vector made
    once, and what the penalties need of the tokens so far: which ids the sequence holds (the prompt
    included, as HF's repetition penalty counts them) and how often each was generated (OpenAI's)."""

    def __init__(self, prompt: list[int], vocab_size: int, device, logit_bias: dict[int, float] | None = None):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(prompt, device=device)] = True
        self.counts = torch.zeros(vocab_size, device=device)
        self.bias = None
        if logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            ids, values = torch.tensor(list(logit_bias)), torch.tensor(list(logit_bias.values()), dtype=torch.float32)
            self.bias[ids.to(device)] = values.to(device)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1

    def apply(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        logits = logits.float().clone()
        if self.bias is not None:
            logits += self.bias
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
    """One sequence's next token from its logits (1, V): logit bias and penalties (when asked for),
    then sample."""
    if penalties is not None:
        logits = penalties.apply(logits, params)
    return int(sample(logits, params, generator)[0])


def _last_logits(model, idx, cache):
    return model(idx, kv_cache=cache)[:, -1, :]  # (B, V)


# inductor's options for every compiled step. decompose_mm_pass: see _compiled_last_logits.
# realize_reads_threshold 1 (from 4): a value that several kernels read, and that reads more than one
# buffer, is computed once and stored, not recomputed in each reader. Unstored, a norm's output was
# recomputed inside each product's loop over the weight's rows, for every row (the 51M's int8 head
# after its norm: 2.4 ms, against 1.4 ms without the norm). Tokens/s on our AVX2 EPYC, two steps
# side by side: 10M 773 -> 859 (float32) and 644 -> 769 (int8wo), 51M 146 -> 153 and 177 -> 234,
# the same tokens (RESULTS.md).
_STEP_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "realize_reads_threshold": 1}


@functools.cache
def _compiled_last_logits():
    """`_last_logits` compiled, one function for every Engine and Scheduler: a model's graph,
    compiled at its first use, serves them all. dynamic=False: every size is fixed but those that
    compiled_step marks dynamic, which are symbols in the graph (and a second model's sizes get
    graphs of their own rather than turning the first's into symbols).
    cpp_wrapper: the graph calls its kernels from C++ rather than Python, which matters at one token
    per call. decompose_mm_pass: inductor turns each product of a row with a weight of at most 2,048
    rows and columns into its own vectorised kernel over the weight's rows, in place of a library
    call (13% more tokens/s on the 10M benchmark model; a larger head stays with oneDNN:
    layers.Linear). (Made on first use: importing the compiler takes about a second.)"""
    # each model (and int8wo copy) gets two graphs of this one function: allow more than Dynamo's 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_last_logits, fullgraph=True, dynamic=False, options={"cpp_wrapper": True, **_STEP_OPTIONS})


def compiled_step(model, idx, rows: SlotRows):
    """The last logits (B, V) of one decoding step, idx (B, 1), through the compiled graph. Two
    graphs serve every step: one for a single row, one for any number of rows (their count and the
    length attended to are symbols), each compiled when first needed (seconds; inductor's cache
    on disk makes it quicker the next time the same model starts)."""
    for t in (idx, rows.pos, *rows.written, *rows.k, *rows.v):
        torch._dynamo.maybe_mark_dynamic(t, 0)  # the rows (a single row keeps a graph of its own)
    for t in (*rows.k, *rows.v):
        torch._dynamo.mark_dynamic(t, 2)  # the positions attended to
    return _compiled_last_logits()(model, idx, rows)


class AheadOfTimeStep:
    """A model's one-row decoding step compiled ahead of time: exported (torch.export, the length
    attended to a dynamic dimension) and compiled by AOTInductor with compiled_step's options. A call
    goes through its C++ runner, without Dynamo's guard check and Python wrapper, which are a third
    of compiled_step's time at one row on a small model (1.5x the tokens/s on the 10M benchmark
    model, 1.1x on the 51M: benchmarks/aot_step.py). It reads the model's own weights (bound, not
    copied) and a SlotCache of one row and `max_len` positions, and attends to fewer than max_len of
    them (export specialises a view that is the whole buffer). The package is kept on disk under a
    hash of the exported program, so that the same model starts in seconds the next time."""

    def __init__(self, model, max_len: int, folder: Path | None = None):
        self.tensors = _bound_tensors(model)
        self.max_len = max_len
        step = _Step(model)
        cache = SlotCache(model.config, 1, max_len, model.tok_emb.weight.device, model.tok_emb.weight.dtype)
        cache.lengths.fill_(1)
        length = torch.export.Dim("length", min=2, max=max_len - 1)
        kv = ({2: length},) * (2 * model.config.n_layer)
        example = _step_inputs(torch.zeros((1, 1), dtype=torch.long, device=cache.lengths.device), cache.rows(0, 1, 1))
        try:
            exported = torch.export.export(step, example, dynamic_shapes=(None, None, None, None, kv))
        except Exception as error:  # noqa: BLE001 (export's many kinds of refusal: one line for the user)
            raise GenerationError(f"the decoding step does not export ({str(error).splitlines()[0]}); "
                                  "--no-compile decodes without compiling") from error
        path = (folder or aot_folder()) / f"step-{_program_hash(exported)}.pt2"
        self.runner = _loaded(path)
        if self.runner is None:  # not there yet, or unreadable: made again
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            with warnings.catch_warnings():  # torch's own deprecation, which its compiler trips over
                warnings.filterwarnings("ignore", message=".*treespec, LeafSpec", category=FutureWarning)
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs={
                    "aot_inductor.package_constants_in_so": False, **_STEP_OPTIONS})
            os.replace(partial, path)  # whole or not at all
            self.runner = torch._inductor.aoti_load_package(str(path))
        named = dict(step.named_parameters(remove_duplicate=False))
        named.update(step.named_buffers(remove_duplicate=False))
        self.runner.load_constants({name: named[name] for name in self.runner.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)

    def __call__(self, idx, rows: SlotRows):
        """The last logits (1, V) of one step, idx (1, 1), over rows of a cache of max_len positions."""
        return self.runner(*_step_inputs(idx, rows))

    def reads(self, model) -> bool:
        """Whether the step still reads this model's weights (not if they were moved or replaced)."""
        return _bound_tensors(model) == self.tensors


class _Step(torch.nn.Module):
    """_last_logits over tensors (what export takes): the rows' positions, where they write, keys, values."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, pos, rows, positions, kv):
        n = self.model.config.n_layer
        return _last_logits(self.model, idx, _GivenRows(pos, (rows, positions), list(kv[:n]), list(kv[n:])))


class _GivenRows(SlotRows):
    def __init__(self, pos, written, k, v):  # noqa: super().__init__ makes these from a SlotCache
        self.pos, self.written, self.k, self.v = pos, written, k, v


def _loaded(path: Path):
    """The package's runner, or None when there is no package or it does not load."""
    if not path.exists():
        return None
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception:  # noqa: BLE001 (a damaged file fails in many ways)
        return None


def _step_inputs(idx, rows: SlotRows) -> tuple:
    return idx, rows.pos, *rows.written, (*rows.k, *rows.v)


def _bound_tensors(model) -> list:
    return [(t.data_ptr(), t.dtype, t.shape) for t in (*model.parameters(), *model.buffers())]


def _program_hash(exported) -> str:
    """What the compiled package depends on: the program, its inputs' and weights' layouts, torch, the CPU."""
    parts = [exported.graph_module.code, str(exported.graph_signature), torch.__version__, str(_STEP_OPTIONS),
             platform.machine(), torch.backends.cpu.get_cpu_capability()]
    parts += [f"{n.name} {_layout(n.meta.get('val'))}" for n in exported.graph.nodes if n.op == "placeholder"]
    parts += [f"{name} {_layout(t)}" for name, t in (*exported.state_dict.items(), *exported.constants.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _layout(t) -> str:
    """A tensor's shape, strides (a cache's length is in them), dtype and device; anything else as it prints."""
    return f"{tuple(t.shape)} {t.stride()} {t.dtype} {t.device}" if torch.is_tensor(t) else str(t)


def aot_folder() -> Path:
    """Where steps compiled ahead of time are kept: $XDG_CACHE_HOME/samovar/aot (~/.cache/samovar/aot)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samovar" / "aot"


_AOT_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {max_len: AheadOfTimeStep}


def ahead_of_time_step(model, max_len: int) -> AheadOfTimeStep:
    """The model's AheadOfTimeStep for caches of max_len positions, made once (again if its weights
    were moved or replaced since) and shared by every Engine of the model."""
    steps = _AOT_STEPS.setdefault(model, {})
    step = steps.get(max_len)
    if step is None or not step.reads(model):
        step = steps[max_len] = AheadOfTimeStep(model, max_len)
    return step


def ahead_of_time_cache_len(tokens: int, context_len: int) -> int:
    """The length of a cache for a step compiled ahead of time that has room for `tokens`: a power of
    two (at least 16; each length is a program of its own), the context at most, and a position to spare."""
    return min(max(16, 1 << (tokens - 1).bit_length()), context_len) + 1


def step_logits(model, idx, rows: SlotRows, compile: bool):
    """The last logits (B, V) of one decoding step over SlotRows: compiled (compiled_step) or eager."""
    return compiled_step(model, idx, rows) if compile else _last_logits(model, idx, rows)


def mask_padding(logits, vocab_limit: int | None):
    """The logits with every id at or above vocab_limit (a vocabulary padded past its tokenizer's)
    made impossible."""
    if vocab_limit and vocab_limit < logits.size(-1):
        logits[..., vocab_limit:] = float("-inf")
    return logits


def check_compilable(model) -> None:
    if is_dynamic_int8(model):
        raise GenerationError("compile does not combine with int8 (FBGEMM's dynamic kernel); "
                              "int8wo (weight-only int8) compiles")
    if model.config.n_expert:  # which tokens reach which expert decides shapes at run time
        raise GenerationError("compile supports dense models; a mixture of experts decodes eagerly")


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
        self.cache: SlotCache | None = None
        self.ids: list[int] = []
        self.prefilled = 0

    def keep(self, prompt: list[int]) -> int:
        """Rewind to the longest cached prefix of `prompt` (leaving at least its last id to prefill)."""
        n = reusable(self.ids, prompt)
        self.ids = self.ids[:n]
        self.cache.rewind(0, n)
        return n


class Engine:
    """Generates token ids from a Transformer; works on ids only (text is the caller's business)."""

    def __init__(self, model, vocab_limit: int | None = None, compile: bool = False):
        """vocab_limit: never produce ids at or above it (a vocabulary padded past its tokenizer's).
        compile: run the one-token step compiled: on the CPU ahead of time (AheadOfTimeStep, for
        caches of a few lengths: ahead_of_time_cache_len), elsewhere through torch.compile
        (compiled_step); the first call compiles it (seconds; the first time for a model up to half
        a minute)."""
        if compile:
            check_compilable(model)
        self.model = model
        self.context_len = model.config.context_len
        self.vocab_limit = vocab_limit
        self.compile = compile
        self.ahead_of_time = compile and model.tok_emb.weight.device.type == "cpu"  # AheadOfTimeStep

    def warm_up(self) -> None:
        """Compile the decoding step now rather than at the first request (compile=True), for the
        cache a conversation keeps (a PrefixCache: the context's length)."""
        if self.compile:
            params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            list(self.generate([0], params, prefix=PrefixCache()))

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams, stop_ids=(),
                 use_cache: bool = True, prefix: PrefixCache | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; stop after max_tokens or at a stop id (not yielded).
        prefix: a PrefixCache kept between calls, whose cached ids this prompt need not prefill again."""
        params.validate(self.model.config.vocab_size)
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(prompt) > self.context_len:
            raise GenerationError(f"the prompt has {len(prompt)} tokens, more than the model's context "
                                  f"of {self.context_len}")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._generate(prompt, params, set() if params.ignore_eos else set(stop_ids), use_cache,
                                      prefix if use_cache else None)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt, params, stop_ids, use_cache, prefix):
        p = self.model.tok_emb.weight
        generator = seeded_generator(params, p.device)
        tokens = list(prompt)
        cache = None
        if prefix is not None:  # the cache of an earlier call: only what is new is prefilled
            size = self._cache_len(self.context_len)
            if prefix.cache is None or prefix.cache.lengths.device != p.device or prefix.cache.max_len != size:
                prefix.cache, prefix.ids = SlotCache(self.model.config, 1, size, p.device, p.dtype), []
            cache = prefix.cache
        elif use_cache:  # room for the request (or, when it outgrows the context, for the context)
            cache = SlotCache(self.model.config, 1, self._cache_len(len(tokens) + params.max_tokens), p.device, p.dtype)
        start = 0
        if prefix is not None:
            start = prefix.keep(tokens)
            prefix.prefilled = len(tokens) - start
            prefix.ids += tokens[start:]
        logits = self._prefill(tokens[start:], cache)  # the prompt, in one pass
        ahead = ahead_of_time_step(self.model, cache.max_len) if self.ahead_of_time and cache is not None else None
        cached = len(tokens)
        penalties = Penalties(tokens, logits.size(-1), p.device, params.logit_bias) if params.penalized else None
        for _ in range(params.max_tokens):
            next_id = choose(logits, params, penalties, generator)
            if next_id in stop_ids:
                return
            yield next_id
            tokens.append(next_id)
            if penalties is not None:
                penalties.add(next_id)
            if cache is None:
                logits = self._prefill(tokens[-self.context_len:], None)
            elif cached >= self.context_len:  # full: keep the recent half and prefill it afresh
                cache.clear(0)
                cached = self.context_len // 2
                logits = self._prefill(tokens[-cached:], cache)
                if prefix is not None:
                    prefix.ids = tokens[-cached:]
            else:
                cached += 1
                logits = self._step(next_id, cache, ahead)
                if prefix is not None:
                    prefix.ids.append(next_id)

    def _cache_len(self, tokens: int) -> int:
        """The length of a cache with room for `tokens` (the context at most): in the lengths the step
        compiled ahead of time is made for, when it runs."""
        size = min(tokens, self.context_len)
        return ahead_of_time_cache_len(size, self.context_len) if self.ahead_of_time else size

    def _prefill(self, ids: list[int], cache: SlotCache | None):
        """The last logits (1, V) after the ids, written into the cache when there is one (eager)."""
        idx = torch.tensor([ids], device=self.model.tok_emb.weight.device)
        rows = None if cache is None else cache.rows(0, 1, len(ids))
        return mask_padding(_last_logits(self.model, idx, rows), self.vocab_limit)

    def _step(self, token: int, cache: SlotCache, ahead: AheadOfTimeStep | None):
        idx = torch.tensor([[token]], device=cache.lengths.device)
        rows = cache.rows(0, 1, 1)
        logits = ahead(idx, rows) if ahead is not None else step_logits(self.model, idx, rows, self.compile)
        return mask_padding(logits, self.vocab_limit)
