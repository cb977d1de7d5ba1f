"""Preference pairs for DPO: JSONL in the format TRL's DPOTrainer reads, rendered with the chat template.

    {"prompt": "Где живёт белка?", "chosen": "в дупле", "rejected": "в дупле в дупле в дупле"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}]}

A prompt is a string (one user turn) or OpenAI-style messages; chosen and rejected are strings or one
assistant message each. Each answer is rendered as the conversation prompt + answer; its tokens after
the prompt's (rendered with the generation prompt: `<|assistant|>`) are the completion, which is
scored, as TRL's DPOTrainer does. The template renders bos and eos once, so none is doubled.

The examples are stored as fine-tuning examples are (conversations.write_examples): pair i is
example 2i (chosen) and example 2i + 1 (rejected).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..chat import ChatError, render
from ..tokenizer import Tokenizer
from .corpus import DataError


def read_pairs(files: list[Path], strict: bool = False) -> tuple[list[tuple[list, dict, dict]], list[str]]:
    """(prompt messages, chosen message, rejected message) of every good line, and one problem a
    malformed line ("FILE line N: why"); with strict, the first malformed line is refused."""
    pairs, problems = [], []
    for file in files:
        with open(file, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    pairs.append(parse_pair(line))
                except UnicodeDecodeError:
                    problem = f"{file} line {n}: not UTF-8 text"
                except (ValueError, ChatError) as e:
                    problem = f"{file} line {n}: {e}"
                else:
                    continue
                if strict:
                    raise DataError(problem) from None
                problems.append(problem)
    return pairs, problems


def parse_pair(line: str) -> tuple[list, dict, dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"no {key!r}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("'prompt' must be a string or a list of messages")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError("each prompt message needs a role (system, user, assistant) and a string content")
    if prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message")
    return prompt, answer(record, "chosen"), answer(record, "rejected")


def answer(record: dict, key: str) -> dict:
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise ValueError(f"{key!r} must be a string or one assistant message")
        value = value["content"]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or one assistant message")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return {"role": "assistant", "content": value}


def pair_example(tok: Tokenizer, prompt: list[dict], reply: dict) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + reply, the mask on the completion: every token after the prompt's."""
    head = render(tok, prompt, add_generation_prompt=True)[0]
    ids = render(tok, prompt + [reply])[0]
    if ids[:len(head)] != head:
        raise DataError("the chat template does not render the prompt as the start of the conversation; "
                        "DPO needs the completion to follow the prompt's tokens")
    return ids, [0] * len(head) + [1] * (len(ids) - len(head))


def preference_examples(tok: Tokenizer, pairs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, index) of the pairs: example 2i is pair i's chosen, 2i + 1 its rejected."""
    ids, mask, index = [], [], []
    for prompt, chosen, rejected in pairs:
        for reply in (chosen, rejected):
            e_ids, e_mask = pair_example(tok, prompt, reply)
            index.append((len(ids), len(ids) + len(e_ids)))
            ids.extend(e_ids)
            mask.extend(e_mask)
    return (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8),
            np.asarray(index, dtype=np.int64).reshape(-1, 2))


def preference_splits(tok: Tokenizer, files: list[Path], val_fraction: float, strict: bool) -> tuple[dict, dict]:
    """The pairs as examples; the last val_fraction of them (at least one) is the validation split."""
    if tok.chat_template is None:
        raise DataError("preference pairs are rendered with the chat template, and this tokenizer has none: give "
                        "the chat model's, --tokenizer RUN/tokenizer.json")
    pairs, problems = read_pairs(files, strict)
    if len(pairs) < 2:
        raise DataError(f"found {len(pairs)} good preference pair(s), need at least 2"
                        + (f"; {problems[0]}" if problems else ""))
    n_val = max(1, int(len(pairs) * val_fraction))
    splits = {"train": preference_examples(tok, pairs[:-n_val]), "val": preference_examples(tok, pairs[-n_val:])}
    return splits, {"kind": "preference", "train": len(pairs) - n_val, "val": n_val, "skipped": len(problems),
                    "problems": problems[:20]}
