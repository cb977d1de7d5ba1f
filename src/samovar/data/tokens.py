"""Corpora -> token files, and batches from them.

`prepare` reads corpora (corpus.py), trains or loads a tokenizer, and writes, nanoGPT-style, for
plain text (streamed, in worker processes: shards.py):

    DIR/tokens-00000.bin ...  DIR/val.bin   token ids, flat numpy arrays (uint16 if the vocabulary fits,
                                            else uint32): the stream in shards, and its tail
    DIR/meta.json                           dtype, token and byte counts, sources, the shards
    DIR/tokenizer.json

and for fine-tuning data (conversations or prompt/answer pairs), the examples and their loss mask:

    DIR/train.bin  DIR/val.bin                       token ids
    DIR/train_mask.bin  DIR/val_mask.bin             1 where a token is one to learn (uint8)
    DIR/train_examples.npy  DIR/val_examples.npy     (start, end) of each example in the .bin
    DIR/tokenizer_config.json                        the chat template, for conversations

Documents are joined with the eos token (when the tokenizer has one); the last `val_fraction` of the
token stream is the validation split. `TokenData` reads the files as memmaps, never into RAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..chat import add_chat_tokens
from ..tokenizer import DEFAULT_SPECIALS, Tokenizer
from .corpus import DataError, find_files, read_documents, split_for_encoding
from .cleaning import CleanOptions, clean_conversations
from .conversations import ReadOptions, ReadReport, read_conversations, split_by_group, write_examples
from .pairs import PAIR_FORMATS, pair_examples
from .shards import ShardedTokens, prepare_corpus


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "char",
            vocab_size: int | None = None, val_fraction: float = 0.1, context_len: int | None = None,
            special_tokens=DEFAULT_SPECIALS, pairs: str | None = None, chat: str | None = None,
            chat_options: ReadOptions | None = None, cleaning: CleanOptions | None = CleanOptions(),
            preference: bool = False, workers: int | None = None, shard_mb: float = 16, sample_mb: float = 100,
            progress: bool = False) -> dict:
    """Tokenize `inputs` into `out`; `tokenizer` is a kind to train or a path to tokenizer.json.
    pairs="qa" or "dialogue": prompt/answer pairs of plain text; chat=FORMAT (conversations.py):
    conversations rendered with the chat template (the tokenizer gains the chat tokens), cleaned first
    unless cleaning is None (cleaning.py). Either writes masked examples for objective=sft instead of
    a plain token stream. preference=True: JSONL preference pairs for objective=dpo (preference.py),
    rendered with `tokenizer`'s chat template (the chat model's tokenizer.json). Plain text of any
    size is streamed into token shards by `workers` processes (shards.py: shard_mb of text a shard,
    the tokenizer trained on sample_mb of it)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if preference:
        return prepare_preference(inputs, out, tokenizer, val_fraction, context_len,
                                  strict=bool(chat_options and chat_options.strict))
    if pairs is not None and pairs not in PAIR_FORMATS:
        raise DataError(f"unknown pairs format {pairs!r}; use {' or '.join(PAIR_FORMATS)}")
    if pairs is not None and chat is not None:
        raise DataError("give --pairs or --chat, not both")
    files = find_files(inputs)
    if chat is None and pairs is None:
        return prepare_corpus(files, out, tokenizer, vocab_size, val_fraction, context_len, special_tokens,
                              workers=workers, shard_mb=shard_mb, sample_mb=sample_mb, progress=progress)
    report = read_conversations(files, chat, chat_options) if chat else None
    cleaned = None
    if report and cleaning is not None:
        report.conversations, cleaned = clean_conversations(report.conversations, cleaning)
        if not report.conversations:
            raise DataError("no conversation is left after cleaning: " + "; ".join(cleaned.lines()))
    docs = [m["content"] for c in report.conversations for m in c.messages] if report else read_documents(files)
    if tokenizer in ("char", "word", "bpe"):
        tok = Tokenizer.train(tokenizer, docs, vocab_size=vocab_size, special_tokens=special_tokens)
    else:
        tok = Tokenizer.load(tokenizer)
    if report:
        tok = add_chat_tokens(tok)
        splits, info = chat_splits(tok, report, val_fraction)
        if cleaned is not None:
            info["cleaning"] = {"changed": dict(cleaned.changed), "dropped": dict(cleaned.dropped),
                                "empty_turns": cleaned.empty_turns}
    else:
        splits, info = pair_splits(tok, docs, pairs, val_fraction)
    return write_splits(out, tok, splits, info, files, docs, context_len)


def prepare_preference(inputs, out, tokenizer: str, val_fraction: float, context_len: int | None,
                       strict: bool) -> dict:
    from .preference import preference_splits

    if tokenizer in ("char", "word", "bpe"):
        raise DataError("preference pairs need the chat model's tokenizer: --tokenizer RUN/tokenizer.json")
    files = find_files(inputs)
    tok = Tokenizer.load(tokenizer)
    splits, info = preference_splits(tok, files, val_fraction, strict)
    return write_splits(out, tok, splits, info, files, None, context_len)


def write_splits(out, tok: Tokenizer, splits: dict, info: dict | None, files: list, docs: list[str] | None,
                 context_len: int | None) -> dict:
    """The splits' files, tokenizer.json and meta.json into `out`; returns the meta."""
    need = (context_len or 1) + 1
    n_train, n_val = len(splits["train"][0]), len(splits["val"][0])
    if n_train < need or n_val < need:
        raise DataError(f"the corpus is too short: {n_train + n_val} tokens give {n_train} train and {n_val} "
                        f"val tokens, fewer than one context of {need} tokens")
    dtype = token_dtype(tok.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        if len(arrays) == 1:
            atomic_write_bytes(out / f"{split}.bin", arrays[0].astype(dtype).tobytes())
        else:
            write_examples(out, split, *arrays, dtype)
    tok.save(out / "tokenizer.json")
    # bytes per split, for bits per byte: the text of each split decoded back
    val_bytes = len(tok.decode(splits["val"][0].tolist()).encode("utf-8"))
    total_bytes = (sum(len(d.encode("utf-8")) for d in docs) if docs is not None
                   else len(tok.decode(splits["train"][0].tolist()).encode("utf-8")) + val_bytes)
    meta = {
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
        "train_tokens": int(n_train), "val_tokens": int(n_val),
        "bytes": total_bytes, "val_bytes": val_bytes,
        "sources": [str(f) for f in files], "documents": len(docs) if docs is not None else len(files),
        **({"examples": info} if info else {}),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def pair_splits(tok: Tokenizer, docs: list[str], fmt: str, val_fraction: float) -> tuple[dict, dict]:
    """Prompt/answer pairs as examples; the last val_fraction of them is the validation split."""
    pairs = [pair for doc in docs for pair in PAIR_FORMATS[fmt](doc)]
    if len(pairs) < 2:
        raise DataError(f"found {len(pairs)} {fmt} pairs: is this a {fmt} file?")
    n_val = max(1, int(len(pairs) * val_fraction))
    splits = {"train": pair_examples(tok, pairs[:-n_val], fmt), "val": pair_examples(tok, pairs[-n_val:], fmt)}
    return splits, {"kind": "pairs", "format": fmt, "train": len(pairs) - n_val, "val": n_val}


def chat_splits(tok: Tokenizer, report: ReadReport, val_fraction: float) -> tuple[dict, dict]:
    """Conversations as examples, split by conversation group."""
    splits, info = {}, {"kind": "chat", "skipped": report.skipped, "problems": report.problems}
    for split, convs in zip(("train", "val"), split_by_group(report.conversations, val_fraction)):
        splits[split] = conversation_examples(tok, convs)
        info[split] = len(convs)
    return splits, info


def conversation_examples(tok: Tokenizer, conversations: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conversations rendered with the tokenizer's chat template, as masked examples (ids, mask, index)."""
    from ..chat import render

    ids, mask, index = [], [], []
    for c in conversations:
        c_ids, c_mask = render(tok, c.messages)
        index.append((len(ids), len(ids) + len(c_ids)))
        ids.extend(c_ids)
        mask.extend(c_mask)
    return (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8),
            np.asarray(index, dtype=np.int64).reshape(-1, 2))


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[int]:
    """Encode and join documents, with eos between them when the tokenizer has one."""
    ids: list[int] = []
    eos = tok.eos_id
    chunks = [split_for_encoding(d) for d in docs]
    for doc_chunks in chunks:
        if ids and eos is not None:
            ids.append(eos)
        for piece in tok.encode_many(doc_chunks):
            ids.extend(piece)
    return ids


@dataclass
class TokenData:
    """train.bin / val.bin of a prepared folder, read through memmaps."""

    folder: Path
    meta: dict
    train: np.ndarray | ShardedTokens
    val: np.ndarray
    _examples: dict = field(default_factory=dict, repr=False)  # split -> (ids, mask, index), read on first use

    @classmethod
    def open(cls, folder: str | Path) -> "TokenData":
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist")
        meta_file = folder / "meta.json"
        if not meta_file.exists():
            raise DataError(f"{folder} has no meta.json: prepare it first with `samovar prepare`")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {meta_file}: {e}") from None
        splits = {}
        files = {"train": [folder / s["file"] for s in meta["shards"]] if "shards" in meta else [folder / "train.bin"],
                 "val": [folder / "val.bin"]}
        for split in ("train", "val"):
            for file in files[split]:
                if not file.exists() or file.stat().st_size == 0:
                    raise DataError(f"{folder} has no tokens in {file.name}")
            splits[split] = np.memmap(files[split][0], dtype=dtype, mode="r") if len(files[split]) == 1 else None
        if "shards" in meta:  # train: the token shards before val's tail (shards.py)
            splits["train"] = ShardedTokens(files["train"], dtype, meta["train_tokens"])
        return cls(folder, meta, splits["train"], splits["val"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.folder / "tokenizer.json")

    @property
    def has_examples(self) -> bool:
        return "examples" in self.meta

    def examples(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, index) of a split's masked examples (conversations or prompt/answer pairs;
        see conversations.masked_batch)."""
        if split not in self._examples:
            if not self.has_examples:
                raise DataError(f"{self.folder} has no conversations or pairs: prepare it with --chat FORMAT "
                                "or --pairs qa|dialogue")
            mask = np.memmap(self.folder / f"{split}_mask.bin", dtype=np.uint8, mode="r")
            index = np.load(self.folder / f"{split}_examples.npy")
            self._examples[split] = (getattr(self, split), mask, index)
        return self._examples[split]

    def n_examples(self, split: str) -> int:
        return len(self.examples(split)[2])

    def check_context(self, context_len: int) -> None:
        for split in ("train", "val"):
            n = len(getattr(self, split))
            if n < context_len + 1:
                raise DataError(f"{split}.bin has {n} tokens, fewer than one context of "
                                f"{context_len} + 1; use a longer corpus or a shorter context_len")

    def batch(self, split: str, batch_size: int, context_len: int, generator: torch.Generator,
              rows: slice = slice(None)):
        """Random windows (nanoGPT): x = tokens[i:i+T], y = tokens[i+1:i+T+1], as int64 (B, T).
        All B window starts are drawn, but only `rows` of them are read (a rank's share of a batch)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - context_len, (batch_size,), generator=generator)[rows].tolist()
        window = np.stack([data[i:i + context_len + 1] for i in starts]).astype(np.int64)
        return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])

    def sequential_batches(self, split: str, batch_size: int, context_len: int):
        """Every token of a split once, in non-overlapping windows (for whole-split evaluation)."""
        data = self.train if split == "train" else self.val
        n = (len(data) - 1) // context_len
        for b in range(0, n, batch_size):
            rows = range(b, min(b + batch_size, n))
            x = np.stack([data[r * context_len:(r + 1) * context_len] for r in rows]).astype(np.int64)
            y = np.stack([data[r * context_len + 1:(r + 1) * context_len + 1] for r in rows]).astype(np.int64)
            yield torch.from_numpy(x), torch.from_numpy(y)
