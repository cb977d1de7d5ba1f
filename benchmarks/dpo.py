"""DPO with LoRA on a small bot's own mistakes, measured on held-out premises before and after.

Starting from the ru_qa chat model of benchmarks/russian_chat.py (`qa-pretrained`, with the `qa`
folder it was fine-tuned on):

1. the model answers --train-premises training conversations greedily; every wrong answer makes a
   pair (chosen: the reference answer, rejected: the model's answer), and every conversation a second
   pair whose rejected answer is a repetitive continuation (the reference answer said four times);
   the same from --held-out held-out conversations gives the held-out pairs;
2. `samovar prepare pairs.jsonl --preference` and `samovar train --init-from SFT --set objective=dpo`
   with LoRA (the reference is the model with its adapters off), for --minutes;
3. before and after, on the held-out conversations (their premises unseen in training): reward
   accuracy and the share of pairs whose chosen answer is more likely than the rejected one, exact
   match, chrF, and the share of answers that repeat a word 3-gram.

    .venv/bin/python benchmarks/dpo.py [--sft runs/russian-chat/qa-pretrained] [--qa runs/russian-chat/qa]
        [--work runs/dpo] [--minutes 4] [--train-premises 1500] [--held-out 300] [--beta 0.1] [--lr 5e-5] [--loss sigmoid]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from samovar.api import LLM, load
from samovar.checkpoint import resolve_checkpoint
from samovar.data import TokenData, masked_batch
from samovar.data.preference import preference_examples
from samovar.evaluation import last_replies, text_scores
from samovar.lora import adapters_disabled
from samovar.train.objectives import sequence_logps

from russian_chat import samovar, write_report  # (benchmarks/ is the script's folder: on sys.path)

TURN = re.compile(r"<\|(system|user|assistant)\|>(.*?)(?=<\|eos\|>)", re.S)


def conversations(folder: Path, split: str, n: int) -> list[tuple[list[dict], str]]:
    """(messages before the last answer, that answer) of n conversations spread over a split."""
    data = TokenData.open(folder)
    tok = data.tokenizer()
    ids, mask, index = data.examples(split)
    spans = last_replies(mask, index)
    spans = spans[::max(1, len(spans) // n)][:n]
    out = []
    for start, begin, stop in spans:
        text = tok.decode(ids[start:begin].tolist())
        messages = [{"role": r, "content": c} for r, c in TURN.findall(text)]
        out.append((messages, tok.decode(ids[begin:stop].tolist(), skip_special=True).strip()))
    return out


def answers(llm: LLM, convs) -> list[str]:
    return [llm.chat(messages, temperature=0, max_tokens=32).strip() for messages, _ in convs]


def pairs_of(convs, said: list[str]) -> list[dict]:
    pairs = []
    for (messages, reference), answer in zip(convs, said):
        if answer != reference and answer:
            pairs.append({"prompt": messages, "chosen": reference, "rejected": answer})
        pairs.append({"prompt": messages, "chosen": reference, "rejected": " ".join([reference] * 4)})
    return pairs


def repeats_a_trigram(text: str) -> bool:
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


@torch.no_grad()
def preference_scores(model, tok, pairs: list[dict], beta: float) -> dict:
    """Reward accuracy (beta * log-ratio to the reference, chosen above rejected; the reference is the
    model with its adapters off) and the share of pairs whose chosen answer is the more likely."""
    rows = [(p["prompt"], {"role": "assistant", "content": p["chosen"]},
             {"role": "assistant", "content": p["rejected"]}) for p in pairs]
    ids, mask, index = preference_examples(tok, rows)
    wins = likelier = 0
    for start in range(0, len(rows), 32):
        n = min(32, len(rows) - start)
        which = [2 * (start + i) for i in range(n)] + [2 * (start + i) + 1 for i in range(n)]
        x, y, m = masked_batch(ids, mask, index, which, model.config.context_len)
        policy = sequence_logps(model(x), y, m)[0]
        with adapters_disabled(model):
            reference = sequence_logps(model(x), y, m)[0]
        reward = beta * (policy - reference)
        wins += int((reward[:n] > reward[n:]).sum())
        likelier += int((policy[:n] > policy[n:]).sum())
    return {"reward_accuracy": wins / len(rows), "chosen_likelier": likelier / len(rows)}


def scores(llm: LLM, convs, pairs, beta: float) -> dict:
    said = answers(llm, convs)
    refs = [r for _, r in convs]
    text = text_scores(said, refs)
    return {**preference_scores(llm.model, llm.tokenizer, pairs, beta), "exact_match": text["exact_match"],
            "chrf": text["chrf"], "repeats": sum(map(repeats_a_trigram, said)) / len(said)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=Path("runs/russian-chat/qa-pretrained"))
    parser.add_argument("--qa", type=Path, default=Path("runs/russian-chat/qa"))
    parser.add_argument("--work", type=Path, default=Path("runs/dpo"))
    parser.add_argument("--minutes", type=float, default=4)
    parser.add_argument("--train-premises", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge"])
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    start, w = time.perf_counter(), args.work
    w.mkdir(parents=True, exist_ok=True)
    sft = resolve_checkpoint(args.sft)
    llm = LLM(*load(sft, device="cpu", dtype="fp32"))
    train_convs = conversations(args.qa, "train", args.train_premises)
    held_convs = conversations(args.qa, "val", args.held_out)
    train_pairs = pairs_of(train_convs, answers(llm, train_convs))
    held_pairs = pairs_of(held_convs, answers(llm, held_convs))
    for name, pairs in (("pairs", train_pairs), ("held-out-pairs", held_pairs)):
        (w / f"{name}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                                         encoding="utf-8")
    print(f"{len(train_pairs)} training pairs, {len(held_pairs)} held-out pairs", flush=True)
    samovar("prepare", w / "pairs.jsonl", "--preference", "--tokenizer", sft / "tokenizer.json",
            "--val-fraction", 0.05, "--out", w / "pairs")
    samovar("train", "--init-from", sft, "--data", w / "pairs", "--out", w / "dpo", "--set", "objective=dpo",
            "--set", f"dpo_beta={args.beta}", "--set", f"dpo_loss={args.loss}", "--set", "lora_rank=16", "--set", "lora_alpha=32",
            "--set", "lora_targets=q_proj,k_proj,v_proj,out_proj,gate_proj,up_proj,down_proj",
            "--set", "precompute_ref=true", "--set", f"max_seconds={args.minutes * 60:g}", "--set", "max_steps=100000",
            "--set", "batch_size=16", "--set", f"lr={args.lr:g}", "--set", "warmup_steps=20", "--set", "eval_interval=100",
            "--set", "eval_steps=4", "--set", "dropout=0")
    before = LLM(*load(w / "dpo", device="cpu", dtype="fp32"))
    with adapters_disabled(before.model):  # the starting model: the adapters off
        first = scores(before, held_convs, held_pairs, args.beta)
    after = scores(before, held_convs, held_pairs, args.beta)
    steps = json.loads((resolve_checkpoint(w / "dpo") / "trainer_state.json").read_text())["step"]
    lines = [f"Measured by `benchmarks/dpo.py --minutes {args.minutes:g} --train-premises {args.train_premises} "
             f"--held-out {args.held_out}` in {(time.perf_counter() - start) / 60:.0f} minutes: "
             f"{len(train_pairs)} training pairs, DPO ({args.loss}, beta {args.beta:g}, lr {args.lr:g}) with LoRA rank 16 for "
             f"{steps} steps; {len(held_convs)} held-out conversations, {len(held_pairs)} held-out pairs.", "",
             "| | before DPO | after DPO |", "|---|---|---|",
             f"| reward accuracy (held-out pairs) | {first['reward_accuracy']:.1%} | {after['reward_accuracy']:.1%} |",
             f"| chosen more likely than rejected | {first['chosen_likelier']:.1%} | {after['chosen_likelier']:.1%} |",
             f"| exact match | {first['exact_match']:.1%} | {after['exact_match']:.1%} |",
             f"| chrF | {first['chrf']:.1f} | {after['chrf']:.1f} |",
             f"| answers repeating a 3-gram | {first['repeats']:.1%} | {after['repeats']:.1%} |"]
    write_report(lines, args.report)


if __name__ == "__main__":
    main()
