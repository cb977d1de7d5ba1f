"""How well cleaning removes the noise of chat dumps, and how little it touches clean text.

Noise of each kind (dates and times, "forwarded from" headers, @mentions, #tags, URLs, e-mail
addresses, phone numbers, HTML, runs of punctuation and emoji, runs of spaces) is planted into a
copy of ../shared/data/ru_dialogues at random places (one item in a turn, at a word boundary). A
planted item counts as removed when the noisy turn cleans to what the turn cleans to with only the
item's residue planted (nothing, or the one "!" or emoji a run collapses to). Clean characters
changed: the share of the original turns' characters that cleaning changes (they hold some noise of
their own: "!!!" runs, the dates of jokes).

    .venv/bin/python benchmarks/cleaning.py [--dialogues N] [--seed S]
"""

from __future__ import annotations

import argparse
import difflib
import random
import sys
from pathlib import Path

from samovar.data import read_conversations
from samovar.data.cleaning import clean_text

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ru_dialogues" / "anekdot_dialogues.txt"
NAMES = ["Иван Петров", "Маша", "Alex Smith", "Котик 🐱", "ДЯДЯ ВАСЯ"]


def noise(kind: str, rng: random.Random) -> tuple[str, str]:
    """(a planted item, its residue: what cleaning should leave of it)."""
    d, m, y, h, mm = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1990, 2025), rng.randint(0, 23), rng.randint(0, 59)
    months = ["января", "марта", "мая", "сентября", "декабря"]
    choices = {
        "date": [f"{d:02d}.{m:02d}.{y}", f"{d} {rng.choice(months)} {y} года", f"{h}:{mm:02d}",
                 f"{y}-{m:02d}-{d:02d} {h:02d}:{mm:02d}", f"March {d}, {y}", f"[{d:02d}.{m:02d}.{y % 100:02d} {h}:{mm:02d}]"],
        "mention": [f"@{rng.choice(['vasya', 'kot_ik', 'Ivan2000', 'super_user'])}"],
        "hashtag": [f"#{rng.choice(['новости', 'юмор', 'fun', 'анекдот'])}"],
        "url": ["https://example.com/a/b?x=1", "http://сайт.рф/страница", "www.site.ru/page.html", "t.me/channel"],
        "email": [f"{rng.choice(['ivan', 'masha.k', 'admin'])}@{rng.choice(['mail.ru', 'gmail.com', 'yandex.ru'])}"],
        "phone": [f"+7 (9{rng.randint(10, 99)}) {rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(10, 99)}",
                  f"8 9{rng.randint(10, 99)} {rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
                  "+44 20 7946 0958"],
        "html": ["<br>", "<b></b>", "<a href=\"https://x.ru\">", "&nbsp;"],
    }
    if kind in choices:
        return rng.choice(choices[kind]), ""
    if kind == "repeats":
        return rng.choice([("!!!!", "!"), ("???", "?"), ("😂😂😂😂", "😂"), ("......", "...")])
    raise ValueError(kind)


KINDS = ["date", "forwarded", "mention", "hashtag", "url", "email", "phone", "html", "repeats", "whitespace"]


def plant(turn: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """(the turn with an item planted, the turn with only its residue planted)."""
    if kind == "forwarded":
        header = f"{rng.choice(['Forwarded from', 'Пересланное сообщение от'])} {rng.choice(NAMES)}\n"
        return header + turn, turn
    spaces = [i for i, c in enumerate(turn) if c == " "] + [len(turn)]
    at = rng.choice(spaces)
    if kind == "whitespace":
        return (turn[:at] + "   " + turn[at + 1:], turn) if at < len(turn) else (turn + "  ", turn)
    item, residue = noise(kind, rng)
    with_residue = turn[:at] + (" " + residue if residue else "") + turn[at:]
    return turn[:at] + " " + item + turn[at:], with_residue


def measure(turns: list[str], seed: int = 0) -> dict:
    rng = random.Random(seed)
    removed = {k: [0, 0] for k in KINDS}
    for n, turn in enumerate(turns):
        kind = KINDS[n % len(KINDS)]
        noisy, residue = plant(turn, kind, rng)
        removed[kind][0] += clean_text(noisy) == clean_text(residue)
        removed[kind][1] += 1
    changed = total = 0
    for turn in turns:
        total += len(turn)
        cleaned = clean_text(turn)
        if cleaned != turn:
            ops = difflib.SequenceMatcher(None, turn, cleaned, autojunk=False).get_opcodes()
            changed += sum(i2 - i1 for tag, i1, i2, _, _ in ops if tag != "equal")
    return {"removed": {k: ok / n for k, (ok, n) in removed.items()}, "clean_chars_changed": changed / total,
            "turns": len(turns)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dialogues", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} is not here")
    conversations = read_conversations([CORPUS]).conversations[:args.dialogues]
    result = measure([m["content"] for c in conversations for m in c.messages], args.seed)
    print(f"{result['turns']:,} turns of ru_dialogues, one item planted in each")
    for kind, share in result["removed"].items():
        print(f"  {kind:<11} planted noise removed: {share:.1%}")
    print(f"  clean characters changed: {result['clean_chars_changed']:.3%}")


if __name__ == "__main__":
    main()
