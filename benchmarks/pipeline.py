"""The corpus pipeline's speed and memory, stage by stage, on generated corpora of growing size.

For each --sizes MB: a corpus of JSONL files is generated (documents of words drawn from the
vocabularies of ../shared/data's English and Russian texts by their frequencies, with 5% exact and 5%
near copies of earlier documents planted), then each stage runs as its own command, one process tree
at a time, and reports MB/s of input text and peak resident memory (the main process, and the largest
worker process):

    samovar data ingest  ->  samovar data dedup  ->  samovar filter apply (ngram)  ->  samovar prepare (bpe)

Memory that stays flat as the corpus grows is what makes a corpus larger than memory possible.
Beside `prepare` with the tokenizer given, the previous in-memory path (read every document, encode
with every core: what `samovar prepare` did before shards) runs on the smallest corpus as the peer.

    .venv/bin/python benchmarks/pipeline.py [--sizes 100 2000] [--work /tmp/pipeline] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RUNNER = """
import json, resource, sys
from samovar.cli import main
code = main(sys.argv[1:])
peak = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(json.dumps({"main_mb": peak(resource.RUSAGE_SELF), "worker_mb": peak(resource.RUSAGE_CHILDREN)}), file=sys.stderr)
sys.exit(code)
"""


def vocabulary(file: Path) -> tuple[np.ndarray, np.ndarray]:
    counts = Counter(re.findall(r"\w+|[.,;:!?]", file.read_text(encoding="utf-8")))
    words = np.array(list(counts))
    freq = np.array(list(counts.values()), dtype=np.float64)
    return words, freq / freq.sum()


def generate(folder: Path, megabytes: float, seed: int = 0, file_mb: int = 64) -> int:
    """JSONL files of generated documents, about `megabytes` of text; returns the documents written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    vocabs = [vocabulary(SHARED / "tinyshakespeare" / "input.txt"),
              vocabulary(SHARED / "russian_novels" / "Dostoyevsky_PrestupleniyeINakazaniye.txt")]
    written, docs, recent, f, n_file = 0, 0, [], None, 0
    while written < megabytes * 1e6:
        if f is None or f.tell() > file_mb * 1e6:
            if f:
                f.close()
            f = open(folder / f"part-{n_file:04d}.jsonl", "w", encoding="utf-8")
            n_file += 1
        roll = rng.random()
        if roll < 0.05 and recent:
            text = rng.choice(recent)  # an exact copy
        elif roll < 0.10 and recent:
            words = rng.choice(recent).split(" ")  # a near copy: 2% of the words replaced
            for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[i] = rng.choice(words)
            text = " ".join(words)
        else:
            words, p = vocabs[rng.random() < 0.5]
            text = " ".join(nprng.choice(words, size=rng.randrange(100, 1200), p=p))
        recent = (recent + [text])[-1000:]
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        f.write(line)
        written += len(text.encode("utf-8"))
        docs += 1
    f.close()
    return docs


def run(args: list[str]) -> tuple[float, dict, str]:
    """seconds, peak memory, stdout of a samovar command in a process of its own."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"samovar {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout


def old_prepare(corpus: Path) -> tuple[float, float, float]:
    """The in-memory path on the same files (read them all, encode on every core): seconds, MB of text, peak MB."""
    code = f"""
import json, resource, time
from pathlib import Path
from samovar.data import encode_documents, find_files, read_documents
from samovar.tokenizer import Tokenizer
tok = Tokenizer.load({str(corpus.parent / 'data' / 'tokenizer.json')!r})
start = time.perf_counter()
docs = read_documents(find_files([{str(corpus)!r}]))
encode_documents(tok, docs)
seconds = time.perf_counter() - start
print(json.dumps([seconds, sum(len(d.encode()) for d in docs) / 1e6, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[100, 2000], help="corpus sizes in MB")
    p.add_argument("--work", default="/tmp/samovar-pipeline")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        root = Path(args.work) / f"{size:g}mb"
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        docs = generate(root / "corpus", size)
        print(f"{size:g} MB: {docs:,} documents generated in {time.perf_counter() - start:.0f} s", flush=True)
        mb = size
        # a filter trained on 32 + 32 examples: English documents kept, Russian ones dropped
        examples = [json.loads(line)["text"] for line in open(root / "corpus" / "part-0000.jsonl", encoding="utf-8")][:400]
        english = [t for t in examples if re.search("[a-z]", t[:50])][:32]
        russian = [t for t in examples if re.search("[а-я]", t[:50])][:32]
        (root / "good.txt").write_text("\n".join(t[:2000] for t in english), encoding="utf-8")
        (root / "bad.txt").write_text("\n".join(t[:2000] for t in russian), encoding="utf-8")
        run(["filter", "train", "--positive", root / "good.txt", "--negative", root / "bad.txt", "--out", root / "filter"])
        stages = [
            ("ingest", ["data", "ingest", root / "corpus", "--out", root / "ingested"]),
            ("dedup", ["data", "dedup", root / "ingested", "--out", root / "unique"]),
            ("filter (ngram)", ["filter", "apply", root / "filter", root / "unique", "--out", root / "kept"]),
            ("prepare (bpe)", ["prepare", root / "kept", "--tokenizer", "bpe", "--vocab-size", args.vocab_size,
                               "--out", root / "data"]),
            ("prepare (tokenizer given)", ["prepare", root / "kept", "--tokenizer", root / "data" / "tokenizer.json",
                                           "--out", root / "data-again"]),
        ]
        for name, command in stages:
            text_mb = mb
            seconds, memory, out = run(command)
            rows.append((size, name, text_mb / seconds, memory["main_mb"], memory["worker_mb"], seconds))
            print(f"  {name:15s} {text_mb / seconds:7.1f} MB/s  {seconds:6.0f} s  peak RSS {memory['main_mb']:6.0f} MB "
                  f"(largest worker {memory['worker_mb']:.0f} MB)   {out.strip().splitlines()[0][:110]}", flush=True)
            if name == "dedup":
                mb = json.loads((root / "unique" / "dedup.json").read_text())["kept_bytes"] / 1e6
            if name.startswith("filter"):
                mb = json.loads((root / "kept" / "filter.json").read_text())["kept_bytes"] / 1e6
        if size == min(args.sizes):  # the peer: the same kept shards, read whole and encoded in memory
            seconds, text_mb, peak = old_prepare(root / "kept")
            rows.append((size, "previous prepare (in memory, tokenizer given)", text_mb / seconds, peak, 0, seconds))
            print(f"  previous prepare, in memory: {text_mb / seconds:.1f} MB/s, peak RSS {peak:.0f} MB", flush=True)
        if not args.keep:
            shutil.rmtree(root)
    print("\n| corpus | stage | MB/s | seconds | peak RSS main | largest worker |\n|---|---|---|---|---|---|")
    for size, name, rate, main_mb, worker_mb, seconds in rows:
        print(f"| {size:g} MB | {name} | {rate:.1f} | {seconds:.0f} | {main_mb:.0f} MB | {worker_mb:.0f} MB |")


if __name__ == "__main__":
    main()
