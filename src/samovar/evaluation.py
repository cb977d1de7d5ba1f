"""Evaluation: loss, perplexity and bits per byte on held-out text; BLEU and chrF of generated answers;
latency (time to first token, decode tokens/s).

Bits per byte = (total loss in nats) / ln 2 / (UTF-8 bytes of the text): unlike loss per token it
compares models with different tokenizers. Every token of the text is predicted exactly once (with up
to context_len - 1 tokens of context), in non-overlapping windows.

Question/answer files (`T: premise`, `Q: question`, `A: answer` blocks) and dialogue files (turns
starting with "- ", dialogues separated by blank lines) become (prompt, reference) pairs: the prompt is
everything before the answer (or the last turn), the model continues it greedily up to the end of the
line, and sacrebleu scores the answers against the references.

Conversations (task chat: a folder prepared with --chat, whose validation split is read, or a file of
conversations) are scored on their last assistant turn: the model is given the conversation before it,
rendered with the chat template, and answers greedily until its end-of-turn token. Beside the scores
stand the share of replies that ended with that token (rather than running to the length limit) and,
for a prepared folder, the scores of always giving the training split's most frequent reply.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .data import (PAIR_FORMATS, DataError, TokenData, conversation_examples, detect_task, find_files, masked_batch,
                   pair_examples, read_conversations, read_documents)


# ---- answers of prompt/answer pairs ---------------------------------------------------------------------
@torch.inference_mode()
def answer_metrics(model, ids, mask, index, batch_size: int = 32) -> dict:
    """Mean loss and perplexity of the tokens to learn (the answers, the assistant's turns) of masked
    examples, given what precedes them: comparable between a decoder-only Transformer and the LSTM
    encoder-decoder."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(index), batch_size):
        x, y, learn = masked_batch(ids, mask, index, range(b, min(b + batch_size, len(index))), model.config.context_len)
        n = int(learn.sum())
        total += model(x.to(device), y.to(device), loss_mask=learn.to(device)).item() * n
        count += n
    model.train(was_training)
    return {"answer_loss": total / count, "answer_perplexity": math.exp(min(total / count, 700)),
            "answer_tokens": count}


# ---- language-model metrics ------------------------------------------------------------------------
@torch.inference_mode()
def lm_metrics(model, ids, n_bytes: int | None = None, batch_size: int = 16) -> dict:
    """Mean loss per token, perplexity and (given the text's UTF-8 size) bits per byte of `ids`."""
    model.eval()
    T = model.config.context_len
    ids = np.asarray(ids)
    n_windows = (len(ids) - 1 + T - 1) // T
    if len(ids) < 2:
        raise DataError("the evaluation text is shorter than two tokens")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, n_windows, batch_size):
        windows = [ids[w * T:w * T + T + 1] for w in range(b, min(b + batch_size, n_windows))]
        length = max(len(w) for w in windows)
        x = torch.zeros(len(windows), length - 1, dtype=torch.long)
        y = torch.full((len(windows), length - 1), -100, dtype=torch.long)  # -100: padding, ignored
        for i, w in enumerate(windows):
            x[i, :len(w) - 1] = torch.from_numpy(w[:-1].astype(np.int64))
            y[i, :len(w) - 1] = torch.from_numpy(w[1:].astype(np.int64))
        n = int((y != -100).sum())
        total += model(x.to(device), y.to(device)).item() * n  # the model's mean loss over its n targets
        count += n
    out = {"tokens": count, "loss": total / count, "perplexity": math.exp(min(total / count, 700))}
    if n_bytes:
        out["bits_per_byte"] = total / math.log(2) / n_bytes
    return out


# ---- question/answer and dialogue data ---------------------------------------------------------------
def text_scores(hypotheses: list[str], references: list[str]) -> dict:
    """BLEU and chrF (sacrebleu, corpus level) and exact match (of the stripped texts)."""
    try:
        import sacrebleu
    except ImportError:
        raise DataError("BLEU and chrF need sacrebleu: pip install 'samovar[eval]'") from None
    return {"examples": len(references), "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "exact_match": sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)}


def generation_metrics(answer, pairs: list[tuple[str, str]]) -> dict:
    """text_scores of answer(prompt) against the references, and three samples."""
    hypotheses = [answer(prompt) for prompt, _ in pairs]
    references = [ref for _, ref in pairs]
    return {**text_scores(hypotheses, references),
            "samples": [{"prompt": p, "reference": r, "answer": h}
                        for (p, r), h in list(zip(pairs, hypotheses))[:3]]}


def lm_answer(llm, max_tokens: int = 48):
    """A model's answer: its greedy continuation of the prompt (the decoder's output for the LSTM
    encoder-decoder), up to the line's end."""
    from .api import new_ids
    from .engine import SamplingParams

    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)

    def answer(prompt: str) -> str:
        ids = llm.tokenizer.encode(prompt)[-(llm.model.config.context_len - max_tokens):]
        out = []
        stop = [llm.tokenizer.eos_id] if llm.tokenizer.eos_id is not None else []
        for token in new_ids(llm.model, ids, greedy, stop, vocab_limit=llm.tokenizer.vocab_size):
            out.append(token)
            if "\n" in llm.tokenizer.decode(out[-4:]):
                break
        return llm.tokenizer.decode(out, skip_special=True).split("\n")[0].strip()

    return answer


# ---- conversations: the assistant's last turn -------------------------------------------------------
def last_replies(mask: np.ndarray, index: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, begin, stop) of each example that has learned tokens: it starts at `start`, and its last
    run of them (the last assistant turn, end-of-turn token included) is ids[begin:stop]."""
    out = []
    for start, end in index:
        learned = np.flatnonzero(mask[start:end])
        if len(learned):
            stop = begin = int(start + learned[-1] + 1)
            while begin > start and mask[begin - 1]:
                begin -= 1
            out.append((int(start), begin, stop))
    return out


def chat_examples(llm, data: str | Path) -> tuple[tuple, tuple | None]:
    """(ids, mask, index) of the conversations to score, and of a prepared folder's training split
    (for the most-frequent-reply baseline; None for a file)."""
    path = Path(data)
    if (path / "meta.json").exists():
        folder = TokenData.open(path)
        if folder.meta.get("examples", {}).get("kind") != "chat":
            raise DataError(f"{path} holds no conversations: prepare it with --chat FORMAT")
        if folder.tokenizer().hf.to_str() != llm.tokenizer.hf.to_str():
            raise DataError(f"{path} was tokenized by another tokenizer than the run's: evaluate on the "
                            "conversation file instead")
        return folder.examples("val"), folder.examples("train")
    report = read_conversations(find_files([path]))
    if not report.conversations:
        raise DataError(f"no conversations found in {data}")
    return conversation_examples(llm.tokenizer, report.conversations), None


def chat_metrics(llm, examples: tuple, train: tuple | None, max_examples: int, max_tokens: int = 64) -> dict:
    """Greedy replies to the conversations before their last assistant turns, scored against those
    turns; how many ended with the end-of-turn token; the most frequent training reply's scores."""
    from .api import new_ids
    from .engine import SamplingParams

    tok, context = llm.tokenizer, llm.model.config.context_len
    if tok.eos_id is None:
        raise DataError("the run's tokenizer has no end-of-turn (eos) token: is it a chat model?")
    ids, mask, index = examples
    spans = last_replies(mask, index)
    spans = spans[::max(1, len(spans) // max_examples)][:max_examples]  # spread over the split
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    user = tok.hf.token_to_id("<|user|>")
    hypotheses, references, ended, samples = [], [], 0, []
    for start, begin, stop in spans:
        prompt = ids[start:begin].tolist()[-(context - max_tokens):]
        out = list(new_ids(llm.model, prompt, greedy, [tok.eos_id], vocab_limit=tok.vocab_size))
        ended += len(out) < max_tokens  # only the end-of-turn token stops it early
        hypotheses.append(tok.decode(out, skip_special=True).strip())
        references.append(tok.decode(ids[begin:stop].tolist(), skip_special=True).strip())
        if len(samples) < 3:
            asked = prompt[len(prompt) - 1 - prompt[::-1].index(user):] if user in prompt else prompt
            samples.append({"prompt": tok.decode(asked, skip_special=True).strip(), "reference": references[-1],
                            "answer": hypotheses[-1]})
    result = {**text_scores(hypotheses, references), "end_of_turn": ended / len(spans), "samples": samples}
    if train is not None:
        t_ids, t_mask, t_index = train
        replies = collections.Counter(tok.decode(t_ids[begin:stop].tolist(), skip_special=True).strip()
                                      for _, begin, stop in last_replies(t_mask, t_index))
        frequent = replies.most_common(1)[0][0]
        result["most_frequent_reply"] = frequent
        result["most_frequent"] = text_scores([frequent] * len(references), references)
    return result


# ---- latency -----------------------------------------------------------------------------------------
@torch.inference_mode()
def latency(model, prompt_tokens: int = 32, new_tokens: int = 64, repeats: int = 3, compile: bool = False) -> dict:
    """Median time to first token (prefill + one sample) and decode tokens/s, greedy, batch 1
    (compile: through the compiled one-token step, compiled in the warm-up round)."""
    from .api import new_ids
    from .engine import SamplingParams

    prompt_tokens = min(prompt_tokens, model.config.context_len // 2)
    new_tokens = min(new_tokens, model.config.context_len - prompt_tokens)
    prompt = [i % model.config.vocab_size for i in range(1, prompt_tokens + 1)]
    ttft, rates = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        stream = new_ids(model, prompt, SamplingParams(max_tokens=new_tokens, temperature=0), compile=compile)
        next(stream)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in stream)
        end = time.perf_counter()
        ttft.append(first - start)
        rates.append((n - 1) / max(end - first, 1e-9))
    return {"ttft_ms": statistics.median(ttft[1:]) * 1000, "decode_tokens_per_s": statistics.median(rates[1:]),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


# ---- the command's whole job -------------------------------------------------------------------------
def read_eval_text(path: str | Path) -> str:
    """The text of a file, a folder of files, or a prepared data folder's validation split."""
    path = Path(path)
    if (path / "meta.json").exists():  # a prepared folder: its held-out tail, decoded
        data = TokenData.open(path)
        return data.tokenizer().decode(data.val.tolist())
    files = find_files([path])
    return "\n\n".join(read_documents(files))


def evaluate(llm, data: str | Path, task: str = "auto", max_examples: int = 100, max_tokens: int | None = None,
             with_latency: bool = True, compile: bool = False) -> dict:
    if task == "chat" or (task == "auto" and is_chat_folder(data)):
        return evaluate_chat(llm, data, max_examples, with_latency, compile)
    text = read_eval_text(data)
    task = detect_task(text) if task == "auto" else task
    if task not in ("lm", "qa", "dialogue"):
        raise DataError(f"unknown task {task!r}; use auto, lm, qa, dialogue or chat")
    seq2seq = llm.model.answers_only
    if seq2seq and task == "lm":
        raise DataError("the lstm-seq2seq baseline answers prompts: evaluate it on qa or dialogue data")
    result = {"data": str(data), "task": task}
    if not seq2seq:  # loss over the whole text: only a language model has one
        ids = llm.tokenizer.encode(text)
        n_bytes = len(text.encode("utf-8"))
        if max_tokens is not None and len(ids) > max_tokens:  # the first max_tokens tokens, and their bytes
            ids = ids[:max_tokens]
            n_bytes = len(llm.tokenizer.decode(ids).encode("utf-8"))
        result.update(lm_metrics(llm.model, ids, n_bytes))
    if task != "lm":
        pairs = PAIR_FORMATS[task](text)
        if not pairs:
            raise DataError(f"no {task} examples found in {data}")
        result.update(answer_metrics(llm.model, *pair_examples(llm.tokenizer, pairs, task)))
        if max_examples > 0:
            step = max(1, len(pairs) // max_examples)  # spread the examples over the file
            result.update(generation_metrics(lm_answer(llm), pairs[::step][:max_examples]))
    if with_latency:
        result.update(latency(llm.model, compile=compile))
    return result


def is_chat_folder(data: str | Path) -> bool:
    meta = Path(data) / "meta.json"
    return meta.exists() and TokenData.open(data).meta.get("examples", {}).get("kind") == "chat"


def evaluate_chat(llm, data: str | Path, max_examples: int = 100, with_latency: bool = True,
                  compile: bool = False) -> dict:
    examples, train = chat_examples(llm, data)
    result = {"data": str(data), "task": "chat", **answer_metrics(llm.model, *examples)}
    if max_examples > 0:
        result.update(chat_metrics(llm, examples, train, max_examples))
    if with_latency:
        result.update(latency(llm.model, compile=compile))
    return result


def add_quantization_cost(result: dict, reference: dict, kind: str) -> dict:
    """Put the float model's perplexities (`reference`, on the same text) beside a quantized model's
    `result`, with the relative cost of rounding: float_perplexity, perplexity_cost, ..."""
    result["quantize"] = kind
    for key in ("perplexity", "answer_perplexity"):
        if key in result and key in reference:
            result[f"float_{key}"] = reference[key]
            result[f"{key}_cost"] = result[key] / reference[key] - 1
    return result


def format_result(run, data, result: dict) -> str:
    """evaluate()'s result as the lines `samovar eval` prints."""
    lines = [f"{run} on {data} ({result['task']}{', ' + result['dtype'] if 'dtype' in result else ''})"]
    if "loss" in result:  # a language model's loss over the whole text (the LSTM baseline has none)
        lines.append(f"  loss {result['loss']:.4f}   perplexity {result['perplexity']:.2f}   "
                     f"bits per byte {result['bits_per_byte']:.4f}   ({result['tokens']:,} tokens)")
    if "answer_loss" in result:
        lines.append(f"  answer loss {result['answer_loss']:.4f}   answer perplexity "
                     f"{result['answer_perplexity']:.2f}   ({result['answer_tokens']:,} answer tokens)")
    if "bleu" in result:
        lines.append(f"  BLEU {result['bleu']:.2f}   chrF {result['chrf']:.2f}   exact match "
                     f"{result['exact_match']:.1%} ({result['examples']} examples)")
        if "end_of_turn" in result:
            lines.append(f"  {result['end_of_turn']:.1%} of the replies ended with the end-of-turn token")
        if "most_frequent" in result:
            m = result["most_frequent"]
            lines.append(f"  always the most frequent training reply ({result['most_frequent_reply']!r}): "
                         f"BLEU {m['bleu']:.2f}   chrF {m['chrf']:.2f}   exact match {m['exact_match']:.1%}")
        for s in result["samples"]:
            lines.append(f"    {s['prompt'].splitlines()[-1]!r} -> {s['answer']!r} (reference {s['reference']!r})")
    for key in ("perplexity", "answer_perplexity"):
        if f"{key}_cost" in result:
            lines.append(f"  {result['quantize']} costs {result[f'{key}_cost']:+.2%} {key.replace('_', ' ')} "
                         f"against the float model ({result[f'float_{key}']:.2f} -> {result[key]:.2f})")
    if "ttft_ms" in result:
        lines.append(f"  time to first token {result['ttft_ms']:.1f} ms   decode "
                     f"{result['decode_tokens_per_s']:.1f} tokens/s")
    return "\n".join(lines)


COMPARE_METRICS = [("perplexity", "perplexity", "{:.2f}"), ("bits_per_byte", "bits/byte", "{:.4f}"),
                   ("answer_perplexity", "answer ppl", "{:.2f}"),
                   ("bleu", "BLEU", "{:.2f}"), ("chrf", "chrF", "{:.2f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
                   ("decode_tokens_per_s", "decode tok/s", "{:.1f}")]


def compare_table(rows: list[dict]) -> str:
    """A plain-text table of evaluate() results, one run a row."""
    present = [(k, h, f) for k, h, f in COMPARE_METRICS if any(k in r for r in rows)]
    header = f"{'run':<32} {'params':>9} " + " ".join(f"{h:>12}" for _, h, _ in present)
    lines = [header, "-" * len(header)]
    for name, r in zip(short_names([r["run"] for r in rows]), rows):
        cells = " ".join(f"{(f.format(r[k]) if k in r else '-'):>12}" for k, _, f in present)
        lines.append(f"{name[-32:]:<32} {r['params'] / 1e6:>8.2f}M {cells}")
    if any("perplexity" in r for r in rows) and not all("perplexity" in r for r in rows):
        lines.append("('-': the lstm-seq2seq baseline only answers prompts, so it has no perplexity or bits per "
                     "byte over whole texts; compare answer ppl)")
    return "\n".join(lines)


def short_names(paths: list[str]) -> list[str]:
    """The fewest trailing path parts that tell the runs apart (runs/a/run and runs/b/run: a/run, b/run)."""
    parts = [Path(p).parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def compare_chart(rows: list[dict], out: str | Path) -> None:
    """One bar chart a metric that every run has, one bar a run; written atomically as PNG."""
    from .plots import bar_charts

    present = [(k, h) for k, h, _ in COMPARE_METRICS if all(k in r for r in rows)]
    bar_charts(short_names([r["run"] for r in rows]), present, rows, out)
