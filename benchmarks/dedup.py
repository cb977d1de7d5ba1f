"""samovar's MinHash beside datasketch's, side by side in one run: signatures' speed (MB/s, one core)
and the near duplicates each finds with the same LSH (14 bands x 8 rows) and the same exact check.

The corpus is benchmarks/pipeline.py's generated one (5% exact and 5% near copies planted). datasketch
hashes each word 5-gram (as UTF-8 bytes) with SHA-1 and permutes with numpy; samovar hashes every word
and shingle of a document at once with numpy (dedup.MinHash).

    .venv/bin/python benchmarks/dedup.py [--mb 20]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import generate
from samovar.data.dedup import Clusters, DedupOptions, MinHash, jaccard, near_duplicates


def datasketch_duplicates(texts: list[str], sets: list[np.ndarray], threshold: float) -> tuple[set, float]:
    import datasketch

    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    clusters = Clusters(len(texts))
    start = time.perf_counter()
    signatures = []
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        m = datasketch.MinHash(num_perm=112, seed=1)
        m.update_batch([" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))])
        signatures.append(m)
    seconds = time.perf_counter() - start
    for j, m in enumerate(signatures):
        for i in lsh.query(m):
            if jaccard(sets[i], sets[j]) >= threshold:
                clusters.union(i, j)
        lsh.insert(j, m)
    return set(np.flatnonzero(clusters.roots() != np.arange(len(texts))).tolist()), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), args.mb)
        texts = [json.loads(line)["text"] for f in sorted(Path(tmp).glob("*.jsonl")) for line in open(f, encoding="utf-8")]
    texts = list(dict.fromkeys(texts))  # exact duplicates out first, as `samovar data dedup` does
    mb = sum(len(t.encode()) for t in texts) / 1e6
    options = DedupOptions()
    hasher = MinHash(options)
    start = time.perf_counter()
    sets = [hasher.shingles(t) for t in texts]
    [hasher.signature(s) for s in sets]
    ours_seconds = time.perf_counter() - start
    ours = near_duplicates(texts, options)
    theirs, theirs_seconds = datasketch_duplicates(texts, sets, options.threshold)
    print(f"{mb:.1f} MB, {len(texts):,} distinct documents; near duplicates found: samovar {len(ours):,}, "
          f"datasketch {len(theirs):,}, both {len(ours & theirs):,}")
    print(f"signatures: samovar {mb / ours_seconds:.1f} MB/s, datasketch {mb / theirs_seconds:.1f} MB/s "
          f"({theirs_seconds / ours_seconds:.1f}x)")


if __name__ == "__main__":
    main()
