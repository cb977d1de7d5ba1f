"""Cleaning conversations: the dates, nicknames, "forwarded from" headers and links a bot otherwise
learns to repeat, removed by rules that are each switchable and each counted; then empty turns,
exact duplicates and near duplicates (dedup.py's MinHash over character 5-grams) dropped.

Each rule removes what it matches (and the space that separated it); `clean_text` applies them
until nothing changes, so cleaning is idempotent, and a text with none of the patterns comes back
byte for byte (tests/test_cleaning.py checks both over Russian and English prose).
"""

from __future__ import annotations

import hashlib
import html
import re
from collections import Counter
from dataclasses import dataclass, field

from .dedup import DedupOptions, near_duplicates

MONTHS_RU = ("января|февраля|марта|апреля|мая|июня|июля|августа|сентября|октября|ноября|декабря|"
             "январь|февраль|март|апрель|май|июнь|июль|август|сентябрь|октябрь|ноябрь|декабрь")
MONTHS_EN = ("January|February|March|April|May|June|July|August|September|October|November|December|"
             "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
EMOJI = "[\U0001F300-\U0001FAFF\u2600-\u27BF\U0001F000-\U0001F2FF]"

# name -> (pattern, replacement); applied in this order
RULES: dict[str, tuple[re.Pattern, str]] = {
    "forwarded": (re.compile(r"^[ \t]*(?:Forwarded from|Переслано от|Пересланное сообщение(?: от)?)\b[^\n]*\n?",
                             re.M | re.I), ""),
    "html": (re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>|&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,6});"), None),
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), ""),
    "url": (re.compile(r"(?:https?://|www\.)[^\s<>\"]+[^\s<>\".,;:!?)\]]"
                       r"|\b[a-z0-9-]+\.(?:ru|com|org|net|io|me)\b(?:/[^\s<>\"]*[^\s<>\".,;:!?)\]])?", re.I), ""),
    "mention": (re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}\b"), ""),
    "hashtag": (re.compile(r"(?<![\w#&])#[^\W\d_][\w]{1,49}"), ""),
    "phone": (re.compile(r"(?<![\w+])(?:\+7|8|\+\d{1,3})[\s(-]*\d{3}[\s)-]*\d{3}[\s-]*\d{2}[\s-]*\d{2}(?!\d)"
                         r"|(?<![\w+])\+\d{1,3}(?:[\s-]?\d{2,4}){2,4}(?!\d)"), ""),
    "date": (re.compile(
        r"\[?\b(?:\d{4}-\d{2}-\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?"
        r"|\d{1,2}[./]\d{1,2}[./](?:\d{4}|\d{2})(?:,?\s+\d{1,2}:\d{2}(?::\d{2})?)?"
        rf"|\d{{1,2}}\s+(?:{MONTHS_RU})(?:\s+\d{{4}}(?:\s*(?:г\.|года|г\b))?)?(?:,?\s+(?:в\s+)?\d{{1,2}}:\d{{2}})?"
        rf"|(?:{MONTHS_EN})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"
        rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{MONTHS_EN})\.?,?\s+\d{{4}}"
        r"|\d{1,2}:\d{2}(?::\d{2})?(?:\s*(?:AM|PM|am|pm))?)\b\]?"), ""),
    "repeats": (re.compile(r"([!?])\1+|\.{4,}|([,;:*~=_])\2{2,}|(" + EMOJI + r")\3+"), None),
    "whitespace": (re.compile(r"[ \t\xa0]{2,}|\n{3,}|^[ \t\xa0]+|[ \t\xa0]+$", re.M), None),
}


GAP = "\ue000"  # (a private-use character) marks where a removal was, until the gaps are closed
_G = rf"{GAP}(?:[ \t]*{GAP})*"  # one or more removals in a row
GAPS = [(re.compile(rf"[ \t]*{_G}(?=[,.!?;:)])"), ""),  # right before punctuation: with the space before it
        (re.compile(rf"[ \t]*{_G}[ \t]*$", re.M), ""),  # at a line's end
        (re.compile(rf"^[ \t]*{_G}[ \t]*", re.M), ""),  # at a line's start
        (re.compile(rf"[ \t]*{_G}[ \t]*"), " ")]  # between words: the one space that separated them


def _close_gaps(text: str) -> str:
    if GAP in text:
        for pattern, replacement in GAPS:
            text = pattern.sub(replacement, text)
    return text


def _repeat(m: re.Match) -> str:
    text = m.group(0)
    return "..." if text[0] == "." else text[0] if m.group(1) or m.group(2) else m.group(3)


def _space(m: re.Match) -> str:
    text = m.group(0)
    return "\n\n" if text.startswith("\n") else "" if m.start() == 0 or m.end() == len(m.string) or \
        m.string[m.start() - 1] == "\n" or m.string[m.end():m.end() + 1] == "\n" else " "


def _html(m: re.Match) -> str:
    text = m.group(0)
    return html.unescape(text) if text.startswith("&") else ""


FUNCTIONS = {"repeats": _repeat, "whitespace": _space, "html": _html}


@dataclass
class CleanOptions:
    rules: tuple[str, ...] = tuple(RULES)  # the rules to apply (all by default)
    dedup: bool = True  # drop exact duplicate conversations
    near_duplicate: float | None = 0.9  # drop conversations this similar to a kept one (None: keep them)

    def __post_init__(self):
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            from .corpus import DataError

            raise DataError(f"unknown cleaning rule {unknown[0]!r}; the rules are {', '.join(RULES)}")
        if self.near_duplicate is not None and not 0.0 < self.near_duplicate <= 1.0:
            from .corpus import DataError

            raise DataError(f"the near-duplicate threshold must be in (0, 1], got {self.near_duplicate}")

    @classmethod
    def keeping(cls, keep: list[str], near_duplicate: float | None = 0.9) -> "CleanOptions":
        """Every rule but those in `keep` (each must be a rule's name)."""
        cls(rules=tuple(keep))  # a misspelt rule is refused by name
        return cls(rules=tuple(r for r in RULES if r not in keep), near_duplicate=near_duplicate)


@dataclass
class CleanReport:
    changed: Counter = field(default_factory=Counter)  # rule -> turns it changed
    dropped: Counter = field(default_factory=Counter)  # why -> conversations dropped
    empty_turns: int = 0

    def lines(self) -> list[str]:
        out = [f"{rule}: {n:,} turns changed" for rule, n in self.changed.most_common()]
        out += [f"empty turns dropped: {self.empty_turns:,}"] if self.empty_turns else []
        out += [f"conversations dropped ({why}): {n:,}" for why, n in self.dropped.most_common()]
        return out


def clean_text(text: str, rules=tuple(RULES), changed: Counter | None = None) -> str:
    """`text` with every rule in `rules` applied until nothing changes; `changed` counts the rules
    whose pattern the text held."""
    if changed is not None:
        changed.update(name for name in rules if RULES[name][0].search(text))
    for _ in range(5):  # a removal can bring two pieces of a pattern together: apply again until none does
        before = text
        for name in rules:
            pattern, replacement = RULES[name]
            text = pattern.sub(FUNCTIONS[name] if replacement is None else replacement or GAP, text)
        text = _close_gaps(text)  # and the spaces around what was removed
        text = RULES["whitespace"][0].sub(_space, text)
        if text == before:
            break
    return text


def clean_conversations(conversations: list, options: CleanOptions | None = None,
                        examples: list | None = None) -> tuple[list, CleanReport]:
    """Clean each turn, drop empty turns (and conversations left without an assistant turn), exact
    duplicate conversations, and, with near_duplicate set, conversations whose MinHash Jaccard
    estimate against a kept one reaches it."""
    options = options or CleanOptions()
    report = CleanReport()
    kept = []
    for conv in conversations:
        messages = []
        for m in conv.messages:
            changed = Counter()
            content = clean_text(m["content"], options.rules, changed)
            report.changed.update(changed)
            if examples is not None and content != m["content"] and len(examples) < 8:
                examples.append((m["content"], content))
            if not content.strip():
                report.empty_turns += 1
                continue
            messages.append({"role": m["role"], "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            report.dropped["no assistant turn left"] += 1
            continue
        kept.append(type(conv)(messages, conv.group))
    if options.dedup:
        seen, unique = set(), []
        for conv in kept:
            key = hashlib.sha1("\x00".join(f"{m['role']}\x01{m['content']}" for m in conv.messages).encode()).digest()
            if key in seen:
                report.dropped["exact duplicate"] += 1
                continue
            seen.add(key)
            unique.append(conv)
        kept = unique
    if options.near_duplicate is not None:
        texts = ["\n".join(m["content"] for m in c.messages) for c in kept]
        drop = near_duplicates(texts, DedupOptions(threshold=options.near_duplicate, unit="char"))
        if drop:
            report.dropped["near duplicate"] += len(drop)
        kept = [c for i, c in enumerate(kept) if i not in drop]
    return kept, report
