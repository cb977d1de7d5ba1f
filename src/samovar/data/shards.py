"""A corpus of any size -> token shards, tokenized in worker processes: what `samovar prepare` writes
for plain text (conversations and pairs are small and go through tokens.py's examples instead).

    DIR/tokens-00000.bin ...   the token stream in order (documents joined by eos), a shard for about
                               --shard-mb of text, each written whole by one worker (temp + rename)
    DIR/val.bin                the stream's last val_fraction, copied out; train is the shards before it
    DIR/tokenizer.json         trained on a sample of the corpus (--tokenizer-sample-mb), or the one given
    DIR/meta.json              counts, and "shards": each file with its token count (written last)
    DIR/prepare.json           what is being prepared: a killed run started again with the same
                               arguments keeps its tokenizer and finished shards and redoes the rest

The corpus is streamed (corpus.document_pieces) into batches of text; a batch is encoded by a worker
while the next ones are read, with at most two batches a worker in flight, so memory is bounded by
--shard-mb and --workers, not by the corpus. The shards joined are the ids that encoding the whole
corpus at once gives (tests/test_shards.py). `ShardedTokens` reads them back as one array.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from ..checkpoint import atomic_path, atomic_write_text
from ..tokenizer import Tokenizer
from .corpus import DataError, document_pieces

SHARD = "tokens-{:05d}.bin"


class ShardedTokens:
    """Token shards read as one array through memmaps: len() and slices (a slice may span shards)."""

    def __init__(self, files: list[Path], dtype, length: int | None = None):
        self.dtype = np.dtype(dtype)
        self.parts = [np.memmap(f, dtype=dtype, mode="r") for f in files if os.path.getsize(f)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.length = int(self.starts[-1]) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise IndexError("ShardedTokens takes slices with step 1")
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo = start - int(self.starts[s])
            hi = min(stop - int(self.starts[s]), len(self.parts[s]))
            pieces.append(self.parts[s][lo:hi])
            start, s = start + hi - lo, s + 1
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def sample_text(files: list[Path], budget: int, seed: int = 0) -> list[str]:
    """About `budget` bytes of the corpus's pieces, each kept with the same probability (all of it
    when it is smaller), for training a tokenizer on a corpus larger than memory."""
    total = sum(_text_bytes(f) for f in files)
    keep = min(1.0, budget / max(1, total))
    rng, sample, size = random.Random(seed), [], 0
    for _, piece in document_pieces(files):
        if keep >= 1.0 or rng.random() < keep or not sample:
            sample.append(piece)
            size += len(piece.encode("utf-8"))
            if size >= budget and keep < 1.0:
                break
    return sample


def _text_bytes(file: Path) -> int:
    """A file's text size: its size, or for Parquet its text column's uncompressed size."""
    if file.suffix.lower() != ".parquet":
        return file.stat().st_size
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(file).metadata
    except Exception as e:  # pyarrow's own errors: a corrupt file
        raise DataError(f"{file}: cannot read it as Parquet: {str(e).splitlines()[0]}") from None
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if "text" not in names:
        raise DataError(f"{file}: cannot read a 'text' column: no such column")
    column = names.index("text")
    return sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))


def _batches(files: list[Path], shard_bytes: int) -> Iterator[list[tuple[bool, str]]]:
    """The corpus's (starts a document, piece) pairs, in batches of about shard_bytes characters."""
    batch, size = [], 0
    for item in document_pieces(files):
        batch.append(item)
        size += len(item[1])
        if size >= shard_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _load_tokenizer(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(path)


def encode_shard(out: Path, index: int, batch: list[tuple[bool, str]], dtype: str, threads: int = 1,
                 tok: Tokenizer | None = None) -> tuple[int, int, int, int]:
    """One batch's ids (eos before each document but the corpus's first) into its shard file.
    Returns (tokens, unknown tokens, documents, UTF-8 bytes)."""
    tok = tok or _worker_tokenizer
    eos = tok.eos_id
    encoded = tok.encode_many([piece for _, piece in batch], threads=threads, arrays=True)
    arrays = []
    for n, ((first, _), ids) in enumerate(zip(batch, encoded)):
        if first and eos is not None and (index, n) != (0, 0):
            arrays.append(np.array([eos]))
        arrays.append(ids)
    ids = np.concatenate(arrays).astype(dtype)
    with atomic_path(out / SHARD.format(index)) as tmp:
        ids.tofile(tmp)
    return _counts(ids, batch, tok)


def prepare_corpus(files: list[Path], out: str | Path, tokenizer: str, vocab_size: int | None, val_fraction: float,
                   context_len: int | None, special_tokens, workers: int | None = None, shard_mb: float = 16,
                   sample_mb: float = 100, progress: bool = False) -> dict:
    """Tokenize the plain text of `files` into token shards under `out` (see the module's docstring)."""
    from tqdm.auto import tqdm

    from .tokens import token_dtype

    if shard_mb <= 0 or sample_mb <= 0 or (workers is not None and workers < 1):
        raise DataError("--shard-mb and --tokenizer-sample-mb must be positive, and --workers at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard_bytes, sample_bytes = int(shard_mb * (1 << 20)), int(sample_mb * (1 << 20))
    record = {"inputs": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],  # a changed
              "tokenizer": tokenizer, "vocab_size": vocab_size,  # file starts afresh rather than reuse old shards
              "special_tokens": list(special_tokens), "shard_bytes": shard_bytes, "sample_bytes": sample_bytes}
    tok = _resumed_tokenizer(out, record)
    if tok is None:
        for stale in list(out.glob("tokens-*.bin")) + [out / "meta.json", out / "val.bin"]:
            stale.unlink(missing_ok=True)
        if tokenizer in ("char", "word", "bpe"):
            tok = Tokenizer.train(tokenizer, sample_text(files, sample_bytes), vocab_size=vocab_size,
                                  special_tokens=special_tokens)
        else:
            tok = Tokenizer.load(tokenizer)
        tok.save(out / "tokenizer.json")
        atomic_write_text(out / "prepare.json", json.dumps(record, indent=2) + "\n")
    (out / "meta.json").unlink(missing_ok=True)  # written again when every shard is done
    dtype = np.dtype(token_dtype(tok.vocab_size)).name

    totals = np.zeros(4, dtype=np.int64)  # tokens, unknown, documents, bytes
    counts: dict[int, int] = {}
    bar = tqdm(total=sum(_text_bytes(f) for f in files), unit="B", unit_scale=True, disable=not progress,
               desc="prepare")

    def done(index: int, result) -> None:
        counts[index] = result[0]
        totals[:] += result
        bar.update(result[3])

    workers = workers or os.cpu_count() or 1
    batches = _batches(files, shard_bytes)
    first, second = next(batches), next(batches, None)
    # one process when asked, or for one shard (no pool to start): it encodes on every core itself
    pool = None if workers == 1 or second is None else \
        ProcessPoolExecutor(workers, initializer=_load_tokenizer, initargs=(str(out / "tokenizer.json"),))
    pending = {}
    try:
        for index, batch in enumerate(itertools.chain([first], [second] if second else [], batches)):
            file = out / SHARD.format(index)
            if file.exists():  # finished before a kill: only its counts are needed
                done(index, _counts(np.memmap(file, dtype=dtype, mode="r"), batch, tok))
            elif pool is None:
                done(index, encode_shard(out, index, batch, dtype, threads=os.cpu_count() or 1, tok=tok))
            else:
                pending[pool.submit(encode_shard, out, index, batch, dtype)] = index
                if len(pending) >= 2 * workers:
                    _collect(pending, done, wait_for_one=True)
        _collect(pending, done, wait_for_one=False)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    bar.close()
    return _finish(out, tok, files, counts, totals, dtype, val_fraction, context_len)


def _collect(pending: dict, done, wait_for_one: bool) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    finished, _ = wait(pending, return_when=FIRST_COMPLETED if wait_for_one else "ALL_COMPLETED")
    for future in finished:
        done(pending.pop(future), future.result())


def _counts(ids: np.ndarray, batch, tok: Tokenizer) -> tuple[int, int, int, int]:
    """A shard's (tokens, unknown tokens, documents begun, UTF-8 bytes of text)."""
    unk = tok.token_id(tok.roles.get("unk"))
    return (len(ids), int((ids == unk).sum()) if unk is not None else 0, sum(first for first, _ in batch),
            sum(len(piece.encode("utf-8")) for _, piece in batch))


def _resumed_tokenizer(out: Path, record: dict) -> Tokenizer | None:
    """The tokenizer of an unfinished run of the same arguments in `out`, else None (start afresh)."""
    saved = out / "prepare.json"
    if not saved.exists() or not (out / "tokenizer.json").exists():
        return None
    try:
        same = json.loads(saved.read_text(encoding="utf-8")) == record
    except json.JSONDecodeError:
        same = False
    return Tokenizer.load(out / "tokenizer.json") if same else None


def _finish(out: Path, tok: Tokenizer, files: list[Path], counts: dict, totals: np.ndarray, dtype: str,
            val_fraction: float, context_len: int | None) -> dict:
    """val.bin (the stream's tail) and meta.json; returns the meta."""
    shard_files = [out / SHARD.format(i) for i in range(len(counts))]
    n = int(totals[0])
    n_val = max(1, int(n * val_fraction))
    need = (context_len or 1) + 1
    if n - n_val < need or n_val < need:
        raise DataError(f"the corpus is too short: {n} tokens give {n - n_val} train and {n_val} "
                        f"val tokens, fewer than one context of {need} tokens")
    stream = ShardedTokens(shard_files, dtype)
    with atomic_path(out / "val.bin") as tmp, open(tmp, "wb") as f:
        for start in range(n - n_val, n, 1 << 22):
            stream[start:min(n, start + (1 << 22))].tofile(f)
    val = np.memmap(out / "val.bin", dtype=dtype, mode="r")
    meta = {
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": dtype,
        "train_tokens": n - n_val, "val_tokens": n_val, "bytes": int(totals[3]), "val_bytes": text_bytes(tok, val),
        "sources": [str(f) for f in files], "documents": int(totals[2]), "unknown_tokens": int(totals[1]),
        "shards": [{"file": f.name, "tokens": counts[i]} for i, f in enumerate(shard_files)],
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def text_bytes(tok: Tokenizer, ids: np.ndarray, chunk: int = 1 << 22) -> int:
    """The UTF-8 size of the text that `ids` decode to, summed a chunk at a time (no decoding)."""
    lengths = tok.byte_lengths()
    return sum(int(lengths[np.asarray(ids[i:i + chunk])].sum()) for i in range(0, len(ids), chunk))
