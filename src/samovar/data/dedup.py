"""Exact and near duplicates: the corpus pipeline's second stage, and the near-duplicate check that
cleaning.py runs on conversations (one implementation).

    samovar data dedup DIR --out DIR [--threshold 0.8] [--shingle 5] [--bands 14] [--rows 8]

A document is an exact duplicate when its (normalised) text's hash was seen before, and a near
duplicate when the Jaccard similarity of its shingle set (word 5-grams by default; character ones
for short texts) with an earlier document's reaches --threshold. Of each cluster of such documents
the first is kept.

Near duplicates are found as nanochat's and FineWeb's pipelines (datatrove) find them: each
document's MinHash signature (bands x rows hash functions, 14 x 8 by default) is cut into bands, and
documents that agree on a whole band are candidates. A candidate pair then counts only when the
exact Jaccard of the two shingle sets reaches the threshold, so nothing below it is dropped; a pair
above it is missed only when no band agrees (probability (1 - s^rows)^bands: 7.6% at s = 0.8,
1.2% at 0.85, for 14 x 8).

The corpus is streamed: one pass over the shards writes each document's signature bands and shingle
set to a work folder (one set of files per shard, in parallel worker processes; a killed run keeps
the shards it finished); the bands are then grouped one at a time, and a second pass writes the kept
documents. Memory holds a few numbers per document, never the text.

Output: DIR/shard-NNNNN.parquet (the input's columns, the kept rows) and DIR/dedup.json (counts,
options, examples of the clusters).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_path, atomic_write_text
from .corpus import DataError, parquet_column
from .stages import StageReport, each_shard, open_work, shards_of, texts_at, write_kept

NON_WORD = re.compile(r"\W+")
CHUNK = 1 << 13  # shingles hashed at once (bounds the (hashes x shingles) product of a long document)


@dataclass(frozen=True)
class DedupOptions:
    threshold: float = 0.8  # the Jaccard similarity from which a document is a near duplicate
    shingle: int = 5  # shingle length, in words ("word") or characters ("char")
    unit: str = "word"
    bands: int = 14
    rows: int = 8
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise DataError(f"the near-duplicate threshold must be in (0, 1], got {self.threshold}")
        if self.shingle < 1 or self.bands < 1 or self.rows < 1:
            raise DataError("shingle, bands and rows must be positive")
        if self.unit not in ("word", "char"):
            raise DataError(f"unit must be word or char, got {self.unit!r}")

    def chance(self, similarity: float) -> float:
        """The probability that a pair of this Jaccard similarity agrees on a whole band (LSH's S-curve)."""
        return 1.0 - (1.0 - similarity ** self.rows) ** self.bands


# ---- signatures ------------------------------------------------------------------------------------------
class MinHash:
    """Shingle sets and their MinHash signatures and band keys, all from the options' seed.

    A shingle is hashed to 32 bits: its words' hashes (or characters' code points), each times a
    random odd number for its place in the shingle, summed. Hash function k of the signature is multiply-add-shift,
    h_k(x) = ((a_k x + b_k) mod 2^64) >> 32, a strongly universal family for 32-bit x."""

    def __init__(self, options: DedupOptions):
        self.options = options
        rng = np.random.default_rng(options.seed)
        n = options.bands * options.rows
        self.a = rng.integers(1, 1 << 63, n, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, n, dtype=np.uint64)
        self.mix = rng.integers(1, 1 << 63, options.shingle, dtype=np.uint64) | np.uint64(1)
        self.band_mix = rng.integers(1, 1 << 63, options.rows, dtype=np.uint64) | np.uint64(1)
        self.position = rng.integers(1, 1 << 63, 64, dtype=np.uint64) | np.uint64(1)  # a word's 64th char on: one

    def shingles(self, text: str) -> np.ndarray:
        """The text's set of shingle hashes, sorted (uint32); a text shorter than one shingle is one."""
        units = self.words(text) if self.options.unit == "word" else \
            np.frombuffer(" ".join(text.lower().split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        if len(units) == 0:
            return np.zeros(0, dtype=np.uint32)
        k = min(self.options.shingle, len(units))
        mixed = np.zeros(len(units) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                mixed += units[j:len(units) - k + 1 + j] * self.mix[j]
        return np.unique((mixed >> np.uint64(32)).astype(np.uint32))

    def words(self, text: str) -> np.ndarray:
        """A 64-bit hash of each word (a run of \\w characters, lowercased), computed for all of them
        at once: sum over a word's characters of code point x a random number for its position."""
        chars = np.frombuffer(NON_WORD.sub(" ", text.lower()).encode("utf-32-le"), dtype=np.uint32)
        letter = chars != 32
        if not letter.any():
            return np.zeros(0, dtype=np.uint64)
        start = letter & ~np.r_[False, letter[:-1]]
        at = np.flatnonzero(letter)
        first = np.maximum.accumulate(np.where(start, np.arange(len(chars)), 0))[at]
        with np.errstate(over="ignore"):
            values = chars[at].astype(np.uint64) * self.position[np.minimum(at - first, len(self.position) - 1)]
            words = np.add.reduceat(values, np.flatnonzero(start[at]))
            words ^= words >> np.uint64(29)  # the high bits, which the shingle keeps, depend on all of them
            return words * np.uint64(0xBF58476D1CE4E5B9)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """The minimum of each hash function over the shingles (uint32; all-ones for an empty set)."""
        sig = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), CHUNK):
                x = shingles[None, start:start + CHUNK].astype(np.uint64)
                np.minimum(sig, ((a * x + b) >> np.uint64(32)).min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def bands(self, signatures: np.ndarray) -> np.ndarray:
        """(n, rows*bands) signatures -> (bands, n) 64-bit keys, one per band: equal bands, equal keys."""
        n = len(signatures)
        rows = signatures.reshape(n, self.options.bands, self.options.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (rows * self.band_mix).sum(axis=2, dtype=np.uint64).T.copy()


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted sets of shingle hashes."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ---- clusters --------------------------------------------------------------------------------------------
class Clusters:
    """Union-find over document numbers; a cluster's root is its first (smallest) document."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def link_band(keys: np.ndarray, alive: np.ndarray, clusters: Clusters, similar, counts: dict,
              max_checks: int = 32) -> None:
    """Join the documents of one band whose keys are equal, when `similar(i, j)` says so: each
    document is checked against the earlier ones of its bucket (up to max_checks of them) that are
    not in its cluster yet."""
    index = np.flatnonzero(alive)
    order = index[np.argsort(keys[index], kind="stable")]  # equal keys: in document order
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        bucket = order[start:start + size].tolist()
        for n, j in enumerate(bucket[1:], 1):
            seen = set()
            for i in bucket[max(0, n - max_checks):n]:
                root = clusters.find(i)
                if root in seen or root == clusters.find(j):
                    continue
                seen.add(root)
                counts["candidates"] += 1
                if similar(i, j):
                    clusters.union(i, j)


def near_duplicates(texts: list[str], options: DedupOptions = DedupOptions()) -> set[int]:
    """Indices of texts that are near duplicates of an earlier one (in memory: short texts such as
    conversations; the corpus pipeline streams instead, with `dedup`)."""
    hasher = MinHash(options)
    sets = [hasher.shingles(t) for t in texts]
    if not sets:
        return set()
    bands = hasher.bands(np.stack([hasher.signature(s) for s in sets]))
    alive = np.array([len(s) > 0 for s in sets])
    clusters = Clusters(len(texts))
    counts = {"candidates": 0}
    for keys in bands:
        link_band(keys, alive, clusters, lambda i, j: jaccard(sets[i], sets[j]) >= options.threshold, counts)
    roots = clusters.roots()
    return set(np.flatnonzero(roots != np.arange(len(texts))).tolist())


# ---- the corpus stage ------------------------------------------------------------------------------------
@dataclass
class DedupReport(StageReport):
    """dedup.json."""

    options: dict = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    clusters: int = 0  # clusters of near duplicates (two documents or more)
    candidates: int = 0  # candidate pairs whose Jaccard was computed
    examples: list = field(default_factory=list)  # a few (kept, dropped, jaccard) pairs


def sign_shard(shard: Path, work: Path, options: DedupOptions) -> int:
    """One shard's exact keys, band keys and shingle sets into `work` (the offsets file last: its
    presence says the shard is done). Returns the number of documents."""
    hasher = MinHash(options)
    keys, signatures, offsets = [], [], [0]
    stem = work / shard.stem
    with atomic_path(stem.with_suffix(".shingles")) as tmp, open(tmp, "wb") as out:
        for text in parquet_column(shard, "text"):
            text = text or ""
            keys.append(text_key(text))
            shingles = hasher.shingles(text)
            signatures.append(hasher.signature(shingles))
            out.write(shingles.tobytes())
            offsets.append(offsets[-1] + len(shingles))
    bands = hasher.bands(np.stack(signatures)) if signatures else np.zeros((options.bands, 0), np.uint64)
    for suffix, array in ((".keys.npy", np.array(keys, dtype=np.uint64)), (".bands.npy", bands),
                          (".offsets.npy", np.array(offsets, dtype=np.int64))):
        with atomic_path(stem.with_name(stem.name + suffix)) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    return len(keys)


class ShingleStore:
    """Reads any document's shingle set back from the work files, by its number in the corpus."""

    def __init__(self, work: Path, shards: list[Path]):
        self.files = [open(work / f"{s.stem}.shingles", "rb") for s in shards]
        self.offsets = [np.load(work / f"{s.stem}.offsets.npy") for s in shards]
        self.starts = np.cumsum([0] + [len(o) - 1 for o in self.offsets])

    def __getitem__(self, doc: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, doc, side="right")) - 1
        lo, hi = self.offsets[s][doc - self.starts[s]], self.offsets[s][doc - self.starts[s] + 1]
        return np.frombuffer(os.pread(self.files[s].fileno(), int(hi - lo) * 4, int(lo) * 4), dtype=np.uint32)

    def close(self):
        for f in self.files:
            f.close()


def dedup(folder: str | Path, out: str | Path, options: DedupOptions = DedupOptions(), workers: int | None = None,
          progress: bool = False) -> DedupReport:
    """Drop the exact and near duplicates of the corpus in `folder` (Parquet shards with a text
    column) into `out` (see the module's docstring)."""
    from tqdm.auto import tqdm

    folder, out = Path(folder), Path(out)
    shards = shards_of(folder)
    work = open_work(folder, shards, out, "dedup", {"options": asdict(options)})
    report = DedupReport(input=str(folder), options=asdict(options))
    report.resumed_shards, _ = each_shard(partial(sign_shard, options=options), shards, work, ".offsets.npy",
                                          workers or os.cpu_count() or 1, progress, "dedup: signatures")

    keys = np.concatenate([np.load(work / f"{s.stem}.keys.npy") for s in shards])
    n = report.documents = len(keys)
    alive = np.zeros(n, dtype=bool)  # the first of each exact text
    alive[np.unique(keys, return_index=True)[1]] = True
    report.exact_duplicates = int(n - alive.sum())
    store = ShingleStore(work, shards)
    sizes = np.concatenate([np.diff(o) for o in store.offsets])
    alive_near = alive & (sizes > 0)
    clusters = Clusters(n)
    counts = {"candidates": 0}
    similar = lambda i, j: jaccard(store[i], store[j]) >= options.threshold  # noqa: E731
    for b in tqdm(range(options.bands), desc="dedup: bands", disable=not progress):
        band = np.concatenate([np.load(work / f"{s.stem}.bands.npy", mmap_mode="r")[b] for s in shards])
        link_band(band, alive_near, clusters, similar, counts)
    roots = clusters.roots()
    near = alive & (roots != np.arange(n))
    report.near_duplicates = int(near.sum())
    report.clusters = int(len(np.unique(roots[near])))
    report.candidates = counts["candidates"]
    keep = alive & ~near
    report.examples = _examples(shards, roots, near, store)
    store.close()

    report.kept, report.bytes, report.kept_bytes = write_kept(shards, out, keep, progress)
    atomic_write_text(out / "dedup.json", json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work)
    return report


def _examples(shards: list[Path], roots: np.ndarray, near: np.ndarray, store: ShingleStore, n: int = 3) -> list:
    pairs = [(int(roots[j]), int(j)) for j in np.flatnonzero(near)[:n]]
    texts = texts_at(shards, {d for p in pairs for d in p})
    return [{"kept": texts[i][:300], "dropped": texts[j][:300], "jaccard": round(jaccard(store[i], store[j]), 3)}
            for i, j in pairs]

