"""`samovar data dedup`: exact and near duplicates, against a brute-force Jaccard comparison and
datasketch's MinHash LSH, on a planted set cut from real text."""

import json
import random
from dataclasses import asdict
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samovar.data import DataError
from samovar.data.dedup import Clusters, DedupOptions, MinHash, dedup, jaccard, near_duplicates, sign_shard
from samovar.data.ingest import IngestOptions, ingest
from samovar.data.stages import open_work

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
NOVELS = SHARED / "russian_novels"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data is absent")


def planted(text: str, n_base: int, seed: int = 0) -> list[str]:
    """Passages of `text`, and for half of them one to three copies with up to 6% of the words
    replaced (Jaccard of word 5-grams from about 0.55 to 1), shuffled."""
    words, rng = text.split(), random.Random(seed)
    bases = []
    for _ in range(n_base):
        start = rng.randrange(len(words) - 400)
        bases.append(words[start:start + rng.randrange(60, 400)])
    docs = [" ".join(b) for b in bases]
    for base in bases[:n_base // 2]:
        for _ in range(rng.randrange(1, 4)):
            p = rng.uniform(0.0, 0.06)
            docs.append(" ".join(w if rng.random() > p else rng.choice(words) for w in base))
    rng.shuffle(docs)
    return docs


def brute_force(docs: list[str], threshold: float) -> set[int]:
    """Every pair's exact Jaccard of word 5-gram sets (intersections as a sparse product); the
    documents after the first of each cluster."""
    from scipy.sparse import csr_matrix

    ids, rows, cols = {}, [], []
    for n, d in enumerate(docs):
        w = re.findall(r"\w+", d.lower())
        grams = {ids.setdefault(tuple(w[i:i + 5]), len(ids)) for i in range(len(w) - 4)}
        rows += [n] * len(grams)
        cols += grams
    x = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(docs), len(ids)))
    common = (x @ x.T).toarray()
    sizes = np.diag(common)
    similar = common >= threshold * (sizes[:, None] + sizes[None, :] - common)
    clusters = Clusters(len(docs))
    for i, j in zip(*np.nonzero(np.triu(similar, 1))):
        clusters.union(int(i), int(j))
    return set(np.flatnonzero(clusters.roots() != np.arange(len(docs))).tolist())


def recall_precision(found: set, truth: set) -> tuple[float, float]:
    return len(found & truth) / len(truth), len(found & truth) / max(1, len(found))


@pytest.mark.parametrize("language", ["en", "ru"])
def test_near_duplicates_match_a_brute_force_jaccard_comparison(language):
    if language == "ru" and not NOVELS.exists():
        pytest.skip("no russian_novels")
    text = SHAKESPEARE.read_text() if language == "en" else (NOVELS / "Dostoyevsky_PrestupleniyeINakazaniye.txt").read_text()
    docs = planted(text, 300, seed=1)
    for options in (DedupOptions(), DedupOptions(threshold=0.9), DedupOptions(threshold=0.7, bands=20, rows=5)):
        truth = brute_force(docs, options.threshold)
        found = near_duplicates(docs, options)
        recall, precision = recall_precision(found, truth)
        print(f"{language} threshold {options.threshold}, {options.bands} x {options.rows}: {len(truth)} near "
              f"duplicates, recall {recall:.3f}, precision {precision:.3f}")
        assert len(truth) > 25
        assert recall >= 0.95 and precision >= 0.99  # candidates are checked by their exact Jaccard


def test_the_same_clusters_as_datasketch():
    """datasketch's MinHash and MinHashLSH (14 bands x 8 rows) over the same shingles, with the same
    exact check of each candidate pair, drop the same documents (up to the few that the band
    lottery gives one and not the other)."""
    datasketch = pytest.importorskip("datasketch")
    docs = planted(SHAKESPEARE.read_text(), 300, seed=2)
    options = DedupOptions()
    hasher = MinHash(options)
    sets = [hasher.shingles(d) for d in docs]
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    clusters = Clusters(len(docs))
    for j, s in enumerate(sets):
        m = datasketch.MinHash(num_perm=112, seed=1)
        m.update_batch([x.tobytes() for x in s])
        for i in lsh.query(m):
            if jaccard(sets[i], s) >= options.threshold:
                clusters.union(i, j)
        lsh.insert(j, m)
    theirs = set(np.flatnonzero(clusters.roots() != np.arange(len(docs))).tolist())
    ours = near_duplicates(docs, options)
    truth = brute_force(docs, options.threshold)
    assert len(ours ^ theirs) <= 0.03 * len(truth)
    assert recall_precision(ours, truth)[0] >= recall_precision(theirs, truth)[0] - 0.02


def test_the_chance_of_finding_a_pair_is_the_s_curve():
    assert DedupOptions().chance(0.8) == pytest.approx(0.924, abs=1e-3)
    assert DedupOptions(threshold=0.7).chance(0.7) < 0.6 < DedupOptions(bands=20, rows=5).chance(0.7)
    run = subprocess.run([sys.executable, "-m", "samovar", "data", "dedup", "missing", "--out", "o", "--threshold",
                          "0.6"], capture_output=True, text=True)
    assert "note: 14 bands of 8 rows find a pair at Jaccard 0.6 with probability 21%" in run.stderr


def test_signatures_are_deterministic_and_need_whole_words():
    hasher = MinHash(DedupOptions(seed=3))
    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
    assert np.array_equal(hasher.signature(hasher.shingles(text)), MinHash(DedupOptions(seed=3)).signature(
        MinHash(DedupOptions(seed=3)).shingles(text)))
    assert np.array_equal(hasher.shingles(text), hasher.shingles(text.upper().replace(",", " ;")))
    assert len(hasher.shingles(text)) == len(re.findall(r"\w+", text)) - 4
    assert len(hasher.shingles("two words")) == 1 and len(hasher.shingles("!!! ...")) == 0
    assert not np.array_equal(hasher.shingles("кот"), hasher.shingles("кит"))


def write_corpus(folder: Path, docs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A planted corpus with 40 exact copies too, ingested into several shards."""
    root = tmp_path_factory.mktemp("dedup")
    docs = planted(SHAKESPEARE.read_text(), 200, seed=4)
    rng = random.Random(5)
    docs += [rng.choice(docs) for _ in range(40)]
    write_corpus(root / "raw", docs)
    ingest([root / "raw"], root / "shards", IngestOptions(shard_bytes=60_000))
    return root, docs


def kept_texts(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [t for shard in sorted(folder.glob("shard-*.parquet")) for t in pq.read_table(shard)["text"].to_pylist()]


def test_the_cli_drops_every_exact_duplicate_and_the_near_ones(ingested, tmp_path):
    root, docs = ingested
    shards = sorted((root / "shards").glob("shard-*.parquet"))
    assert len(shards) >= 4
    run = subprocess.run([sys.executable, "-m", "samovar", "data", "dedup", str(root / "shards"), "--out",
                          str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "exact and" in run.stdout and "MB/s" in run.stdout
    report = json.loads((tmp_path / "out" / "dedup.json").read_text())
    normalised = kept_texts(root / "shards")  # the texts as ingest normalised them
    assert report["documents"] == len(normalised) == len(docs)
    assert report["exact_duplicates"] == len(normalised) - len(set(normalised)) >= 30
    kept = kept_texts(tmp_path / "out")
    assert len(kept) == len(set(kept)) == report["kept"]  # every exact duplicate is gone
    unique = list(dict.fromkeys(normalised))
    truth = brute_force(unique, 0.8)
    assert report["near_duplicates"] == len(unique) - len(kept)
    near = near_duplicates(unique)
    assert kept == [d for i, d in enumerate(unique) if i not in near]  # streamed from shards = in memory
    assert recall_precision({i for i, d in enumerate(unique) if d not in set(kept)}, truth)[0] >= 0.95
    assert report["examples"] and report["examples"][0]["jaccard"] >= 0.8
    assert not (tmp_path / "out" / ".work").exists()


def test_one_worker_and_a_killed_run_give_the_same_shards(ingested, tmp_path):
    root, _ = ingested
    dedup(root / "shards", tmp_path / "a", workers=2)
    # what a run killed after hashing its first shard leaves behind, then the run again
    shards = sorted((root / "shards").glob("shard-*.parquet"))
    work = open_work(root / "shards", shards, tmp_path / "b", "dedup", {"options": asdict(DedupOptions())})
    sign_shard(shards[0], work, DedupOptions())
    (work / f"{shards[1].stem}.shingles").write_bytes(b"half")  # killed between its files: not done
    report = dedup(root / "shards", tmp_path / "b", workers=1)
    assert report.resumed_shards == 1
    work = open_work(root / "shards", shards, tmp_path / "c", "dedup", {"options": asdict(DedupOptions())})
    sign_shard(shards[0], work, DedupOptions())
    assert dedup(root / "shards", tmp_path / "c", DedupOptions(seed=1)).resumed_shards == 0  # other options: redone
    for name in [s.name for s in shards]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(DataError, match="finished dedup"):
        dedup(root / "shards", tmp_path / "b")


def test_bad_inputs_are_one_line_errors(tmp_path):
    def fails(*args):
        run = subprocess.run([sys.executable, "-m", "samovar", "data", "dedup", *args], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        return run.stderr

    assert "is not a folder" in fails(str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "no Parquet shards" in fails(str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "shard-00000.parquet").write_bytes(b"not parquet")
    assert "cannot read" in fails(str(tmp_path / "bad"), "--out", str(tmp_path / "o"))
    assert "threshold" in fails(str(tmp_path / "bad"), "--out", str(tmp_path / "o"), "--threshold", "1.5")
