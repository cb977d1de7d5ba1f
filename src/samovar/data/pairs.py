"""Question/answer (`T:`/`Q:`/`A:` blocks) and dialogue ("- " turns) files as prompt/answer pairs,
stored as ids with an index, and batched with a mask over the answer tokens for objective=sft."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from ..tokenizer import Tokenizer
from .corpus import DataError


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


def write_pairs(tok: Tokenizer, docs: list[str], fmt: str, out: Path, val_fraction: float, dtype) -> dict:
    """Prompt/answer pairs for supervised fine-tuning: {split}_pairs.bin holds the ids of each pair
    (prompt, then " answer" and a newline, then eos when the tokenizer has one), and
    {split}_pairs.npy the (start, answer start, end) of each pair in it. The last val_fraction of
    the pairs is the validation split."""
    pairs = [pair for doc in docs for pair in PAIR_FORMATS[fmt](doc)]
    if len(pairs) < 2:
        raise DataError(f"found {len(pairs)} {fmt} pairs: is this a {fmt} file?")
    n_val = max(1, int(len(pairs) * val_fraction))
    counts = {}
    for split, chunk in (("train", pairs[:-n_val]), ("val", pairs[-n_val:])):
        ids, index = encode_pairs(tok, chunk, fmt)
        atomic_write_bytes(out / f"{split}_pairs.bin", np.asarray(ids, dtype=dtype).tobytes())
        buf = io.BytesIO()
        np.save(buf, index)
        atomic_write_bytes(out / f"{split}_pairs.npy", buf.getvalue())
        counts[split] = len(chunk)
    return counts


def encode_pairs(tok: Tokenizer, pairs: list[tuple[str, str]], fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of the pairs and their (start, answer start, end) rows. The answer is what the text
    continues the prompt with: " answer" after "A:" (just "answer" after a dialogue's "- "), a
    newline, and eos when the tokenizer has one."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    ids, index = [], []
    for prompt, answer in pairs:
        p, a = tok.encode(prompt), tok.encode((" " if fmt == "qa" else "") + answer + "\n") + eos
        index.append((len(ids), len(ids) + len(p), len(ids) + len(p) + len(a)))
        ids.extend(p + a)
    return np.asarray(ids, dtype=np.int64), np.asarray(index, dtype=np.int64).reshape(-1, 3)


def pair_batch(ids: np.ndarray, index: np.ndarray, which, context_len: int):
    """Pairs `which` (row numbers of index) as (x, y, loss_mask), each (B, T): x is prompt + answer,
    y is x shifted by one, loss_mask is true where y is an answer token. Rows are right-padded; a
    row longer than context_len + 1 loses the start of its prompt."""
    rows = []
    for i in which:
        start, answer, end = (int(v) for v in index[i])
        begin = max(start, end - context_len - 1)
        if answer - begin < 1:
            raise DataError(f"an answer is longer than the context of {context_len} tokens")
        rows.append((np.asarray(ids[begin:end], dtype=np.int64), answer - begin))
    T = max(len(r) for r, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (row, prompt_len) in enumerate(rows):
        n = len(row) - 1
        x[b, :n] = torch.from_numpy(row[:-1])
        y[b, :n] = torch.from_numpy(row[1:])
        mask[b, prompt_len - 1:n] = True
    return x, y, mask
