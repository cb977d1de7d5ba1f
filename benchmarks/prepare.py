"""Tokenizing speed of `samovar prepare` for byte-level BPE, beside HF tokenizers, on ../shared/data.

Both produce the same ids (checked here on every run): HF `tokenizers` encoding the corpus as one
string, and samovar's path (the corpus cut at lone newlines into ~64 KB pieces, encoded by tiktoken
from the same merges on every core). Prints MB/s of each and the ratio, medians of --repeats runs.

    .venv/bin/python benchmarks/prepare.py [--data ../shared/data] [--vocab-size 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from samovar.data import encode_documents, find_files, read_documents
from samovar.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-mb", type=float, default=None, help="use only the first N MB (quick runs)")
    args = p.parse_args()
    docs = read_documents(find_files([args.data]))
    if args.max_mb:
        docs = ["".join(docs)[:int(args.max_mb * 1e6)]]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    tok = Tokenizer.train("bpe", docs, vocab_size=args.vocab_size)
    ours, theirs = [], []
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
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{n_bytes / 1e6:.1f} MB of {len(docs)} documents, byte-level BPE vocab {tok.vocab_size}, ids identical")
    print(f"HF tokenizers, one string per document: {b:6.2f} MB/s")
    print(f"samovar prepare (tiktoken, {len(ours)} runs):  {a:6.2f} MB/s   ratio {a / b:.1f}x")


if __name__ == "__main__":
    main()
