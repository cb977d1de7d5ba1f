"""Tokenizing speed of `samovar prepare` for byte-level BPE, beside HF tokenizers, on ../shared/data.

All produce the same ids (checked here on every run): HF `tokenizers` encoding the corpus as one
string; the in-memory path (the corpus read whole, cut into ~64 KB pieces where the pre-tokenizer
splits anyway, encoded by tiktoken from the same merges on every core); and `prepare` itself, which
streams the files into token shards written by worker processes (--shard-mb 1 here, so that this
small corpus makes several). Prints MB/s of each and the ratios, medians of --repeats runs.

    .venv/bin/python benchmarks/prepare.py [--data ../shared/data] [--vocab-size 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import tempfile

import numpy as np

from samovar.data import TokenData, encode_documents, find_files, prepare, read_documents
from samovar.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-mb", type=float, default=None, help="use only the first N MB (quick runs)")
    p.add_argument("--copies", type=int, default=1, help="the corpus N times over (a larger corpus of real text)")
    args = p.parse_args()
    files = find_files([args.data])
    if args.copies > 1:  # links to the files, N times, in a folder of their own
        many = tempfile.TemporaryDirectory()
        for n in range(args.copies):
            for i, f in enumerate(files):
                os.symlink(f.resolve(), f"{many.name}/{n:03d}-{i:02d}{f.suffix}")
        args.data = many.name
        files = find_files([args.data])
    docs = read_documents(files)
    if args.max_mb:
        docs = ["".join(docs)[:int(args.max_mb * 1e6)]]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    tok = Tokenizer.train("bpe", docs, vocab_size=args.vocab_size)
    scratch = tempfile.TemporaryDirectory()
    tok.save(f"{scratch.name}/tokenizer.json")
    ours, theirs, sharded = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = encode_documents(tok, docs)
        ours.append(n_bytes / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        slow = []
        for d in docs:  # the reference: each document as one string, eos between documents
            if slow:
                slow.append(tok.eos_id)
            slow.extend(tok.hf.encode(d, add_special_tokens=False).ids)
        theirs.append(n_bytes / (time.perf_counter() - start) / 1e6)
        if fast != slow:
            raise SystemExit("token ids differ from HF tokenizers' one-string encoding")
        if not args.max_mb:
            start = time.perf_counter()
            out = f"{scratch.name}/data{len(sharded)}"  # a new folder: an old one would be continued, not redone
            prepare([args.data], out, tokenizer=f"{scratch.name}/tokenizer.json", shard_mb=1)
            sharded.append(n_bytes / (time.perf_counter() - start) / 1e6)
            data = TokenData.open(out)
            if np.concatenate([np.asarray(data.train), data.val]).tolist() != slow:
                raise SystemExit("prepare's token shards differ from HF tokenizers' one-string encoding")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{n_bytes / 1e6:.1f} MB of {len(docs)} documents, byte-level BPE vocab {tok.vocab_size}, ids identical")
    print(f"HF tokenizers, one string per document: {b:6.2f} MB/s")
    print(f"in memory (tiktoken, {len(ours)} runs):      {a:6.2f} MB/s   ratio {a / b:.1f}x")
    if sharded:
        c = statistics.median(sharded)
        print(f"samovar prepare, token shards by {os.cpu_count()} worker processes, files read and written: "
              f"{c:6.2f} MB/s   ratio {c / b:.1f}x ({c / a:.2f}x the in-memory path)")


if __name__ == "__main__":
    main()
