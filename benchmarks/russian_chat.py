"""The Russian chat bot's whole path, measured: pretrain on Russian novels, fine-tune on ru_qa as
conversations (the premise one turn, the question a later one) and on ru_dialogues, score the
answers, and chat.

Every step is a `samovar` command, printed before it runs, so the report can be reproduced by hand
(src/samovar/recipes/russian-chat.toml lists the same commands):

1. a BPE tokenizer and pretraining on ../shared/data/russian_novels (--pretrain-minutes);
2. ru_qa prepared as conversations, 10% of the premises held out; three models fine-tuned for the
   same --sft-minutes on the same split: the pretrained model, the same model from scratch, and the
   LSTM seq2seq baseline; each scored with `samovar eval --task chat` on the held-out premises
   (exact match, chrF, the share of replies ending with the end-of-turn token), beside always
   giving the most frequent training answer;
3. ru_dialogues prepared with and without cleaning; the pretrained model fine-tuned on each; both
   models' answer loss on both validation splits; a few exchanges with `samovar chat`.

    .venv/bin/python benchmarks/russian_chat.py [--work DIR] [--pretrain-minutes 12] [--sft-minutes 5]
        [--examples 300] [--report FILE]

About 50 minutes on a 2-core CPU with the defaults; the report (markdown) goes to --report and stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXCHANGES = ["Привет! Как дела?", "Что ты делаешь вечером?", "А почему?"]


def samovar(*args, stdin: str | None = None) -> str:
    """Run one samovar command (printed first), return its stdout; stop at the first failure."""
    args = [str(a) for a in args]
    print("$ samovar " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "samovar", *args], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"samovar {args[0]} failed:\n{result.stderr.strip()}")
    return result.stdout


def evaluate(run: Path, data: Path, examples: int) -> dict:
    return json.loads(samovar("eval", run, "--data", data, "--task", "chat", "--json", "--no-latency",
                              "--max-examples", examples, "--dtype", "fp32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/russian-chat"), help="data and runs go here")
    parser.add_argument("--pretrain-minutes", type=float, default=12)
    parser.add_argument("--sft-minutes", type=float, default=5)
    parser.add_argument("--examples", type=int, default=300, help="held-out conversations to answer")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark reads the shared corpora")
    w, start = args.work, time.perf_counter()
    pretrain, sft = f"max_seconds={args.pretrain_minutes * 60:g}", f"max_seconds={args.sft_minutes * 60:g}"
    tuned = ["--set", "objective=sft", "--set", sft, "--set", "lr=3e-3", "--set", "muon_lr=0.02"]

    samovar("prepare", DATA / "russian_novels", "--tokenizer", "bpe", "--vocab-size", 4000, "--out", w / "novels")
    samovar("train", "--config", "russian-chat", "--data", w / "novels", "--out", w / "novels-run", "--set", pretrain)
    tokenizer = w / "novels-run" / "tokenizer.json"

    # ru_qa: the answer needs the premise, said one turn before the question
    samovar("prepare", DATA / "ru_qa" / "premise_question_answer6.txt", "--chat", "qa", "--tokenizer", tokenizer,
            "--val-fraction", 0.1, "--out", w / "qa")
    samovar("train", "--init-from", w / "novels-run", "--data", w / "qa", "--out", w / "qa-pretrained", *tuned)
    samovar("train", "--config", "russian-chat", "--data", w / "qa", "--out", w / "qa-scratch",
            "--set", "objective=sft", "--set", sft)
    samovar("train", "--preset", "lstm-seq2seq", "--data", w / "qa", "--out", w / "qa-lstm",
            "--set", "objective=sft", "--set", sft)
    qa = {name: evaluate(w / f"qa-{name}", w / "qa", args.examples) for name in ("pretrained", "scratch", "lstm")}

    # ru_dialogues with and without cleaning, each model scored on both validation splits
    dialogues = DATA / "ru_dialogues" / "anekdot_dialogues.txt"
    prepared = samovar("prepare", dialogues, "--chat", "dialogue", "--tokenizer", tokenizer,
                       "--out", w / "dialogues-clean")
    cleaning = next((line for line in prepared.splitlines() if line.startswith("cleaning:")), "cleaning: -")
    samovar("prepare", dialogues, "--chat", "dialogue", "--tokenizer", tokenizer, "--no-clean",
            "--out", w / "dialogues-raw")
    loss = {}
    for kind in ("clean", "raw"):
        samovar("train", "--init-from", w / "novels-run", "--data", w / f"dialogues-{kind}",
                "--out", w / f"chat-{kind}", *tuned)
        for split in ("clean", "raw"):
            loss[kind, split] = evaluate(w / f"chat-{kind}", w / f"dialogues-{split}", args.examples)
    transcript = samovar("chat", w / "chat-clean", "--temperature", 0, "--repetition-penalty", 1.1,
                         "--max-tokens", 48, "--dtype", "fp32", stdin="\n".join(EXCHANGES) + "\n")

    lines = [f"Measured by `benchmarks/russian_chat.py --pretrain-minutes {args.pretrain_minutes:g} "
             f"--sft-minutes {args.sft_minutes:g} --examples {args.examples}` in "
             f"{(time.perf_counter() - start) / 60:.0f} minutes.", "",
             f"ru_qa, {qa['pretrained']['examples']} held-out conversations (their premises unseen in training), "
             "greedy answers:", "",
             "| model | exact match | chrF | ends with end-of-turn | answer loss |", "|---|---|---|---|---|"]
    names = {"pretrained": "pretrained on the novels, then fine-tuned", "scratch": "the same model, fine-tuned only",
             "lstm": "LSTM seq2seq baseline"}
    for name, r in qa.items():
        lines.append(f"| {names[name]} | {r['exact_match']:.1%} | {r['chrf']:.1f} | {r['end_of_turn']:.1%} | "
                     f"{r['answer_loss']:.3f} |")
    m = qa["pretrained"]["most_frequent"]
    lines += [f"| always the most frequent answer ({qa['pretrained']['most_frequent_reply']!r}) | "
              f"{m['exact_match']:.1%} | {m['chrf']:.1f} | - | - |", "",
              f"ru_dialogues ({cleaning}), the pretrained model fine-tuned on each preparation; answer loss "
              "(and the share of replies ending with end-of-turn) on each validation split:", "",
              "| fine-tuned on | cleaned validation | uncleaned validation |", "|---|---|---|"]
    for kind in ("clean", "raw"):
        cells = [f"{loss[kind, s]['answer_loss']:.3f} ({loss[kind, s]['end_of_turn']:.0%})" for s in ("clean", "raw")]
        lines.append(f"| {'cleaned' if kind == 'clean' else 'uncleaned'} | {cells[0]} | {cells[1]} |")
    lines += ["", "`samovar chat` (greedy, repetition penalty 1.1) with the model fine-tuned on cleaned dialogues:",
              "", "```"]
    replies = [r for r in transcript.strip().split("\n") if r.strip()]
    for said, reply in zip(EXCHANGES, replies):
        lines += [f"> {said}", reply]
    lines.append("```")
    write_report(lines, args.report)


def write_report(lines: list[str], file: Path | None) -> None:
    """The report to stdout, and to `file` when given."""
    report = "\n".join(lines) + "\n"
    print(report)
    if file:
        file.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
