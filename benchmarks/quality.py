"""F1 of `samovar filter`'s two kinds (setfit, ngram) on held-out labelled sets, English and Russian.

Trained on --train examples a class (a few dozen, as SetFit is meant for), tested on --test others:
    en  "academic or not": positive = explanatory paragraphs of the scientific libraries' docstrings
        installed here (scipy, scikit-learn, numpy); negative = Shakespeare passages and the same
        docstrings' parameter lists and code examples
    ru  literary prose or not: positive = passages of ../shared/data/russian_novels; negative = the
        jokes of ../shared/data/ru_dialogues and the T/Q/A records of ../shared/data/ru_qa

    .venv/bin/python benchmarks/quality.py [--train 32] [--test 200] [--kinds setfit ngram] [--iterations 5]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import time
from pathlib import Path

from samovar.data.quality import train_filter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def passages(text: str, rng: random.Random, n: int, lo: int = 150, hi: int = 700) -> list[str]:
    """n passages of lo..hi characters from `text`, whitespace made single spaces, cut at word ends."""
    words, out = text.split(), []
    while len(out) < n:
        start = rng.randrange(len(words) - 200)
        piece, length = [], rng.randrange(lo, hi)
        for w in words[start:]:
            piece.append(w)
            if sum(map(len, piece)) + len(piece) >= length:
                break
        out.append(" ".join(piece))
    return out


def docstring_paragraphs() -> tuple[list[str], list[str]]:
    """(prose, boilerplate) paragraphs of the docstrings of scientific modules."""
    prose, boiler = [], []
    for name in ("scipy.stats", "scipy.optimize", "scipy.signal", "scipy.linalg", "scipy.interpolate",
                 "sklearn.linear_model", "sklearn.cluster", "sklearn.decomposition", "sklearn.ensemble",
                 "numpy.linalg", "numpy.fft", "numpy.random"):
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, attr, None)) if not attr.startswith("_") else None
            for para in (doc or "").split("\n\n"):
                flat = " ".join(para.split())
                if len(flat) < 150:
                    continue
                code = ">>>" in para or re.search(r"^\S+ : ", para, re.M) or re.search(r"^-{3,}$", para, re.M)
                if code:
                    boiler.append(flat[:700])
                elif sum(c.isalpha() or c == " " for c in flat) > 0.9 * len(flat):
                    prose.append(flat[:700])
    return list(dict.fromkeys(prose)), list(dict.fromkeys(boiler))


def english(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    prose, boiler = docstring_paragraphs()
    rng.shuffle(prose)
    rng.shuffle(boiler)
    shakespeare = passages((SHARED / "tinyshakespeare" / "input.txt").read_text(), rng, n // 2)
    negative = shakespeare + boiler[:n - n // 2]
    rng.shuffle(negative)
    return prose[:n], negative


def russian(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    novels = " ".join(f.read_text(encoding="utf-8") for f in sorted((SHARED / "russian_novels").glob("*.txt")))
    jokes = [" ".join(j.split()) for j in
             (SHARED / "ru_dialogues" / "anekdot_dialogues.txt").read_text(encoding="utf-8").split("\n\n\n")]
    qa = [" ".join(r.split()) for r in (SHARED / "ru_qa" / "premise_question_answer6.txt").read_text(
        encoding="utf-8").split("\n\n")]
    jokes = [j for j in jokes if len(j) >= 80]
    qa = list(dict.fromkeys(r for r in qa if len(r) >= 40))
    negative = rng.sample(jokes, n - n // 4) + rng.sample(qa, n // 4)
    rng.shuffle(negative)
    return passages(novels, rng, n), negative


def f1(scores, labels, threshold: float = 0.5) -> float:
    tp = sum(s >= threshold and y for s, y in zip(scores, labels))
    fp = sum(s >= threshold and not y for s, y in zip(scores, labels))
    fn = sum(s < threshold and y for s, y in zip(scores, labels))
    return 2 * tp / max(1, 2 * tp + fp + fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=32, help="labelled examples a class to train on")
    p.add_argument("--test", type=int, default=200, help="held-out examples a class")
    p.add_argument("--kinds", nargs="+", default=["setfit", "ngram"])
    p.add_argument("--languages", nargs="+", default=["en", "ru"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=5,
                   help="SetFit's pairs an example (its default, and samovar filter train's, is 20: 4x the time)")
    args = p.parse_args()
    rows = []
    for language in args.languages:
        rng = random.Random(args.seed)
        positive, negative = (english if language == "en" else russian)(rng, args.train + args.test)
        test = positive[args.train:] + negative[args.train:]
        labels = [1] * len(positive[args.train:]) + [0] * len(negative[args.train:])
        for kind in args.kinds:
            start = time.perf_counter()
            qf = train_filter(positive[:args.train], negative[:args.train], kind, seed=args.seed,
                              iterations=args.iterations)
            trained = time.perf_counter() - start
            start = time.perf_counter()
            scores = qf.score(test)
            rate = len(test) / (time.perf_counter() - start)
            rows.append((language, kind, f1(scores, labels), trained, rate, len(test)))
            print(f"{language} {kind:6s}: F1 {rows[-1][2]:.3f} on {len(test)} held-out ({args.train} + {args.train} "
                  f"to train, {trained:.0f} s); {rate:,.0f} documents/s scoring", flush=True)
    print("\n| language | kind | F1 | train time | documents/s |\n|---|---|---|---|---|")
    for language, kind, score, trained, rate, _ in rows:
        print(f"| {language} | {kind} | {score:.3f} | {trained:.0f} s | {rate:,.0f} |")


if __name__ == "__main__":
    main()
