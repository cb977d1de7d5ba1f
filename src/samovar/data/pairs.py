"""Question/answer (`T:`/`Q:`/`A:` blocks) and dialogue ("- " turns) files as prompt/answer pairs of
plain text (no chat template: for any model, the LSTM baseline included), stored as masked examples
(conversations.py) for objective=sft, with the mask over the answer tokens."""

from __future__ import annotations

import re

import numpy as np

from ..tokenizer import Tokenizer


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from `T:/Q:/A:` blocks; the prompt ends with "A:"."""
    pairs = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line for line in block.strip().split("\n") if line.strip()]
        answers = [i for i, line in enumerate(lines) if line.startswith("A:")]
        if not answers:
            continue
        i = answers[-1]
        prompt = "\n".join(lines[:i]) + "\nA:"
        pairs.append((prompt, lines[i][2:].strip()))
    return pairs


def dialogue_pairs(text: str) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from dialogues: the earlier turns, then "- ", against the last turn."""
    pairs = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        turns = [line for line in block.strip().split("\n") if line.startswith("- ")]
        if len(turns) < 2:
            continue
        pairs.append(("\n".join(turns[:-1]) + "\n- ", turns[-1][2:].strip()))
    return pairs


def detect_task(text: str) -> str:
    head = text[:20_000]
    if re.search(r"^Q:.*\nA:", head, re.M):
        return "qa"
    if len(re.findall(r"^- ", head, re.M)) > 10:
        return "dialogue"
    return "lm"


PAIR_FORMATS = {"qa": qa_pairs, "dialogue": dialogue_pairs}


def pair_examples(tok: Tokenizer, pairs: list[tuple[str, str]], fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt/answer pairs as masked examples (conversations.py): (ids, mask, index). The answer is
    what the text continues the prompt with: " answer" after "A:" (just "answer" after a dialogue's
    "- "), a newline, and eos when the tokenizer has one; the mask covers it."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    ids, mask, index = [], [], []
    for prompt, answer in pairs:
        p, a = tok.encode(prompt), tok.encode((" " if fmt == "qa" else "") + answer + "\n") + eos
        index.append((len(ids), len(ids) + len(p) + len(a)))
        ids.extend(p + a)
        mask.extend([0] * len(p) + [1] * len(a))
    return (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8),
            np.asarray(index, dtype=np.int64).reshape(-1, 2))
