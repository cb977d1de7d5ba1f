"""Corpora -> token files, and batches from them.

`prepare` reads text files, folders of them, JSONL (a "text" field per line) and Parquet (a "text"
column; needs pyarrow), trains or loads a tokenizer, and writes, nanoGPT-style:

    DIR/train.bin  DIR/val.bin   token ids, a flat numpy array (uint16 if the vocabulary fits, else uint32)
    DIR/meta.json                dtype, token and byte counts, sources, tokenizer kind
    DIR/tokenizer.json

Documents are joined with the eos token (when the tokenizer has one); the last `val_fraction` of the
token stream is the validation split. `TokenData` reads the files as memmaps, never into RAM.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, atomic_write_text
from .tokenizer import DEFAULT_SPECIALS, Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ".parquet", ""}


class DataError(ValueError):
    pass


def find_files(inputs: list[str | Path]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no text files (.txt, .md, .jsonl, .parquet)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return files


def read_documents(files: list[Path]) -> list[str]:
    """One string per document: a whole text file, or each "text" of a JSONL file. CRLF -> LF."""
    docs = []
    for file in files:
        if file.suffix.lower() == ".parquet":
            docs.extend(_parquet_texts(file))
            continue
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text (bad byte at offset {e.start}); "
                            "convert it first, e.g. iconv -f cp1251 -t utf-8") from None
        text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        if file.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_texts(file, text))
        elif text.strip():
            docs.append(text)
    if not any(d.strip() for d in docs):
        raise DataError("the corpus is empty: no text in " + ", ".join(str(f) for f in files[:3]))
    return docs


def _jsonl_texts(file: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{file}:{n}: expected an object with a "text" string')
        out.append(record["text"])
    return out


def _parquet_texts(file: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(file, columns=["text"])
    except Exception as e:  # pyarrow's own errors: a corrupt file, no "text" column
        raise DataError(f"{file}: cannot read a \"text\" column: {str(e).splitlines()[0]}") from None
    return [t.replace("\r\n", "\n") for t in table.column("text").to_pylist() if isinstance(t, str)]


# ---- question/answer and dialogue pairs ---------------------------------------------------------------
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
