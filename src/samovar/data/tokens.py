"""Corpora -> token files, and batches from them.

`prepare` reads corpora (corpus.py), trains or loads a tokenizer, and writes, nanoGPT-style:

    DIR/train.bin  DIR/val.bin   token ids, a flat numpy array (uint16 if the vocabulary fits, else uint32)
    DIR/meta.json                dtype, token and byte counts, sources, tokenizer kind
    DIR/tokenizer.json

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
from ..tokenizer import DEFAULT_SPECIALS, Tokenizer
from .corpus import DataError, find_files, read_documents
from .pairs import PAIR_FORMATS, write_pairs


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "char",
            vocab_size: int | None = None, val_fraction: float = 0.1, context_len: int | None = None,
            special_tokens=DEFAULT_SPECIALS, pairs: str | None = None) -> dict:
    """Tokenize `inputs` into `out`; `tokenizer` is a kind to train or a path to tokenizer.json.
    pairs="qa" or "dialogue" also writes prompt/answer pairs for supervised fine-tuning."""
    if pairs is not None and pairs not in PAIR_FORMATS:
        raise DataError(f"unknown pairs format {pairs!r}; use {' or '.join(PAIR_FORMATS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    files = find_files(inputs)
    docs = read_documents(files)
    if tokenizer in ("char", "word", "bpe"):
        tok = Tokenizer.train(tokenizer, docs, vocab_size=vocab_size, special_tokens=special_tokens)
    else:
        tok = Tokenizer.load(tokenizer)
    ids = encode_documents(tok, docs)
    n_val = max(1, int(len(ids) * val_fraction))
    n_train = len(ids) - n_val
    need = (context_len or 1) + 1
    if n_train < need or n_val < need:
        raise DataError(f"the corpus is too short: {len(ids)} tokens give {n_train} train and {n_val} "
                        f"val tokens, fewer than one context of {need} tokens")
    dtype = token_dtype(tok.vocab_size)
    arr = np.asarray(ids, dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "train.bin", arr[:n_train].tobytes())
    atomic_write_bytes(out / "val.bin", arr[n_train:].tobytes())
    tok.save(out / "tokenizer.json")
    pair_counts = write_pairs(tok, docs, pairs, out, val_fraction, dtype) if pairs else None
    # bytes per split, for bits per byte: the text of each split decoded back
    val_bytes = len(tok.decode(arr[n_train:].tolist()).encode("utf-8"))
    total_bytes = sum(len(d.encode("utf-8")) for d in docs)
    meta = {
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
        "train_tokens": int(n_train), "val_tokens": int(n_val),
        "bytes": total_bytes, "val_bytes": val_bytes,
        "sources": [str(f) for f in files], "documents": len(docs),
        **({"pairs": {"format": pairs, **pair_counts}} if pairs else {}),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


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


def split_for_encoding(text: str, target: int = 1 << 16) -> list[str]:
    """Cut `text` into ~64 KB pieces after a lone newline that follows a non-space character and is
    followed by one (or by a single space and one).

    GPT-2's pre-tokenizer makes such a newline a piece of its own whether or not the text goes on
    after it (a longer run of whitespace at the end of a string would be one piece instead), and a
    single space joins the word after it either way, so encoding the pieces separately gives the same
    ids as encoding the whole text, in parallel."""
    def boundary(i: int) -> bool:
        if text[i - 1] != "\n" or text[i - 2].isspace():
            return False
        return not text[i].isspace() or (text[i] == " " and not text[i + 1].isspace())

    pieces, start = [], 0
    while len(text) - start > target:
        cut = start + target
        while cut < len(text) - 2 and not boundary(cut):
            cut += 1
        if cut >= len(text) - 2:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


@dataclass
class TokenData:
    """train.bin / val.bin of a prepared folder, read through memmaps."""

    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    _pair_cache: dict = field(default_factory=dict, repr=False)  # split -> (ids, index), read on first use

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
        for split in ("train", "val"):
            file = folder / f"{split}.bin"
            if not file.exists() or file.stat().st_size == 0:
                raise DataError(f"{folder} has no tokens in {split}.bin")
            splits[split] = np.memmap(file, dtype=dtype, mode="r")
        return cls(folder, meta, splits["train"], splits["val"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.folder / "tokenizer.json")

    @property
    def has_pairs(self) -> bool:
        return "pairs" in self.meta

    def pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, index) of a split's prompt/answer pairs (see encode_pairs and pair_batch)."""
        if split not in self._pair_cache:
            if not self.has_pairs:
                raise DataError(f"{self.folder} has no prompt/answer pairs: prepare it with --pairs qa or dialogue")
            ids = np.memmap(self.folder / f"{split}_pairs.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
            self._pair_cache[split] = (ids, np.load(self.folder / f"{split}_pairs.npy"))
        return self._pair_cache[split]

    def n_pairs(self, split: str) -> int:
        return len(self.pairs(split)[1])

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
