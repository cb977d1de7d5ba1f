"""The Python API: `load` and `generate`, and `LLM`, which ties model, tokenizer and Engine together.

    model, tokenizer = samovar.load("runs/shakespeare")
    print(samovar.generate(model, tokenizer, "ROMEO:", max_tokens=200, temperature=0.8, top_k=50))

    llm = samovar.LLM.from_path("runs/shakespeare")
    for piece in llm.stream("ROMEO:", max_tokens=200):
        print(piece, end="", flush=True)

    bot = samovar.LLM.from_path("runs/chat")          # a model fine-tuned on conversations
    print(bot.chat([{"role": "user", "content": "Привет!"}], temperature=0))
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from . import checkpoint as ckpt
from .config import ModelConfig
from .engine import Engine, GenerationError, PrefixCache, SamplingParams
from .lstm import Seq2SeqLSTM
from .model import Transformer, build_model
from .quantize import quantize as quantize_model
from .runtime import resolve_device, resolve_dtype
from .tokenizer import Tokenizer


def load(path: str | Path, device: str = "auto", dtype: str = "auto",
         quantize: str | None = None, bf16_on_cpu: bool = True) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a checkpoint folder or a run folder (its latest checkpoint), in eval mode.
    The tokenizer is None when the folder has no tokenizer.json (an HF import without one).
    quantize="int8" or "int8wo": int8 Linear weights for faster decoding (see quantize.py).
    A LoRA checkpoint loads its base (refused when the base has changed) with the adapters beside
    the weights, unmerged (`samovar merge-lora` folds them in).
    bf16_on_cpu=False: dtype auto means fp32 on every CPU (runtime.resolve_dtype)."""
    folder = ckpt.resolve_checkpoint(path)
    cfg = ModelConfig.load(folder / "config.json")
    dev = resolve_device(device)
    model = build_model(cfg)
    if ckpt.load_checkpoint_into(model, folder) and quantize:
        raise ckpt.CheckpointError(f"{folder} holds LoRA adapters: merge them first (samovar merge-lora "
                                   f"{path} --out DIR), then quantize the merged model")
    # (auto's bf16 on a CPU with native bf16 was measured for Transformers, whose int8 comes from float32)
    bf16_on_cpu = bf16_on_cpu and cfg.arch == "transformer" and quantize is None
    model.to(device=dev, dtype=resolve_dtype(dtype, dev, bf16_on_cpu)).eval()
    model = quantize_model(model, quantize)
    tokenizer = Tokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
    return model, tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from bos (or eos, the document separator)."""
    if prompt:
        return tokenizer.encode(prompt)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise GenerationError("the prompt is empty and the tokenizer has no bos or eos token to start from")
    return [start]


class TextStream:
    """Text from ids given one at a time, in time linear in their number: each id is decoded with the
    few ids before it (what a tokenizer's decoder needs to place spaces), bytes that do not yet form a
    whole character are held back, and so is text that may begin a stop string. `add` returns the text
    that is ready; `stopped` turns true at the first stop string (the text ends before it); `finish`
    returns what was held back. Special tokens (bos, eos, pad) are left out of the text, as HF's
    text-generation pipeline does."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] was decoded already; ids[read:] is new
        self.pending = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special=True)
        if text.endswith("\ufffd") or len(text) <= len(before):  # an incomplete UTF-8 sequence, or nothing yet
            return ""
        self.pending += text[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        ready, self.pending, self.stopped = split_at_stop(self.pending, self.stop)
        return ready

    def finish(self) -> str:
        if self.stopped:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special=True)
        self.pending += self.tokenizer.decode(self.ids[self.prefix:], skip_special=True)[len(before):]
        ready, self.pending, _ = split_at_stop(self.pending, self.stop, final=True)
        return ready


def stream_text(tokenizer: Tokenizer, ids: Iterator[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Text pieces from a stream of ids (see TextStream), ending before the first stop string (then the
    stream of ids is closed)."""
    text = TextStream(tokenizer, stop)
    for i in ids:
        ready = text.add(i)
        if ready:
            yield ready
        if text.stopped:
            close = getattr(ids, "close", None)
            if close is not None:
                close()
            return
    ready = text.finish()
    if ready:
        yield ready


def split_at_stop(text: str, stop: tuple[str, ...], final: bool = False) -> tuple[str, str, bool]:
    """(text to give out, text to hold back, whether a stop string was found): the text before the
    earliest stop string; or all but the longest tail that begins one (all of it when final)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    if found:
        return text[:min(found)], "", True
    if final:
        return text, "", False
    hold = max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
    return text[:len(text) - hold], text[len(text) - hold:], False


def new_ids(model, prompt: list[int], params: SamplingParams, stop_ids=(), vocab_limit: int | None = None,
            compile: bool = False, prefix: PrefixCache | None = None):
    """New ids from either kind of model: the Transformer's Engine (compile: its compiled one-token
    step), or the LSTM baseline's decoder (greedy only)."""
    if isinstance(model, Seq2SeqLSTM):
        if params.temperature != 0:
            raise GenerationError("the lstm-seq2seq baseline decodes greedily: use temperature 0")
        return model.generate(prompt, params.max_tokens, [] if params.ignore_eos else stop_ids)
    return Engine(model, vocab_limit=vocab_limit, compile=compile).generate(prompt, params, stop_ids=stop_ids,
                                                                           prefix=prefix)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, *, stream: bool = False, compile: bool = False,
             **sampling):
    """The continuation of `prompt` as text, without the prompt (`samovar generate` prints the prompt,
    then this), or an iterator of text pieces when stream=True. `sampling`: any SamplingParams field
    (max_tokens=256, temperature=1.0 (0 is greedy), top_k, top_p, min_p, repetition_penalty,
    frequency_penalty, presence_penalty, stop=[texts], seed, ignore_eos); generation stops at the eos
    token unless ignore_eos is set. compile: decode through the compiled one-token step."""
    if tokenizer is None:
        raise GenerationError("this checkpoint has no tokenizer.json; copy the model's tokenizer.json into it")
    return _continue(model, tokenizer, prompt_ids(tokenizer, prompt), sampling_params(sampling), stream, compile)


def chat(model: Transformer, tokenizer: Tokenizer, messages: list[dict], *, stream: bool = False,
         compile: bool = False, prefix: PrefixCache | None = None, **sampling):
    """The assistant's reply to `messages` (the conversation so far) as text, or an iterator of text
    pieces when stream=True: the conversation rendered with the tokenizer's chat template and a
    generation prompt, continued until the end-of-turn token (the eos). `sampling` as for generate.
    prefix: a PrefixCache kept across a conversation's turns (ChatSession.prefix): the earlier turns'
    keys and values are reused, and only the new turn is prefilled."""
    from .chat import render

    if tokenizer is None:
        raise GenerationError("this checkpoint has no tokenizer.json; copy the model's tokenizer.json into it")
    params = sampling_params(sampling)
    return _continue(model, tokenizer, render(tokenizer, messages, add_generation_prompt=True)[0], params,
                     stream, compile, prefix)


def sampling_params(sampling: dict) -> SamplingParams:
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise GenerationError(f"unknown sampling option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    sampling = {k: v for k, v in sampling.items() if v is not None}  # None: the default
    stop = sampling.get("stop", ())
    params = SamplingParams(**{**sampling, "stop": (stop,) if isinstance(stop, str) else tuple(stop)})
    params.validate()
    return params


def _continue(model, tokenizer: Tokenizer, ids: list[int], params: SamplingParams, stream: bool, compile: bool,
              prefix: PrefixCache | None = None):
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    pieces = stream_text(tokenizer, new_ids(model, ids, params, stop, vocab_limit=tokenizer.vocab_size,
                                            compile=compile, prefix=prefix), params.stop)
    if stream:
        return pieces
    return "".join(pieces)


class LLM:
    """A model with its tokenizer, ready to generate."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_path(cls, path: str | Path, device: str = "auto", dtype: str = "auto",
                  quantize: str | None = None, bf16_on_cpu: bool = True) -> "LLM":
        return cls(*load(path, device, dtype, quantize, bf16_on_cpu))

    def generate(self, prompt: str, **kwargs) -> str:
        return generate(self.model, self.tokenizer, prompt, stream=False, **kwargs)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        return generate(self.model, self.tokenizer, prompt, stream=True, **kwargs)

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's reply to the conversation `messages` ({"role", "content"} dicts)."""
        return chat(self.model, self.tokenizer, messages, stream=False, **kwargs)

    def chat_stream(self, messages: list[dict], **kwargs) -> Iterator[str]:
        return chat(self.model, self.tokenizer, messages, stream=True, **kwargs)

    def save(self, folder: str | Path) -> Path:
        return ckpt.save_checkpoint(folder, self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
