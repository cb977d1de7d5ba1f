"""Conversations, in the formats people have them, and masked examples: the one representation of
fine-tuning data (token ids, a loss mask over what the model should learn to say, and where each
example starts and ends). Prompt/answer pairs (pairs.py) are its two-turn case.

Formats (`--chat FORMAT`, or `auto` from the file):

    openai     JSONL, {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} a line
    sharegpt   JSONL, {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]} a line
    columns    CSV or Parquet with a question and an answer column (names are options)
    telegram   a Telegram Desktop export (result.json): one sender is the assistant, consecutive
               messages of a sender are one turn, a long gap starts a new conversation
    dialogue   "- " turns a line, dialogues separated by blank lines, user and assistant alternating
    qa         T:/Q:/A: blocks: the premise is the first user turn, the question a later one

A malformed line or row is reported with its file and line and skipped (or, with strict, refused).
Every conversation has a `group`: conversations of one group (the paraphrases of one ru_qa premise)
go to the same split.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from .corpus import DataError, read_text

FORMATS = ("auto", "openai", "sharegpt", "columns", "telegram", "dialogue", "qa")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    messages: list[dict]
    group: str | None = None  # conversations of one group go to one split


@dataclass
class ReadOptions:
    strict: bool = False  # refuse a malformed line instead of skipping it
    question: str = "question"  # columns: the column names
    answer: str = "answer"
    assistant: str | None = None  # telegram: the sender (name or id) who is the assistant
    gap_hours: float = 4.0  # telegram: a longer silence starts a new conversation


@dataclass
class ReadReport:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, "file:line: what"

    def bad(self, where: str, what: str, options: ReadOptions) -> None:
        if options.strict:
            raise DataError(f"{where}: {what} (without --strict it is skipped)")
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(f"{where}: {what}")


def read_conversations(files: list[Path], fmt: str = "auto", options: ReadOptions | None = None) -> ReadReport:
    options = options or ReadOptions()
    if fmt not in FORMATS:
        raise DataError(f"unknown conversation format {fmt!r}; use {', '.join(FORMATS)}")
    report = ReadReport()
    for file in files:
        kind = detect_format(file) if fmt == "auto" else fmt
        READERS[kind](file, options, report)
    if not report.conversations:
        raise DataError(f"no conversations with an assistant turn in {', '.join(map(str, files[:3]))}"
                        + (f" ({report.problems[0]})" if report.problems else ""))
    return report


def detect_format(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in (".csv", ".parquet"):
        return "columns"
    text = read_text(file)
    if suffix == ".json":
        return "telegram"
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            record = {}
        for key, kind in (("messages", "openai"), ("conversations", "sharegpt")):
            if isinstance(record, dict) and key in record:
                return kind
        raise DataError(f"{file}: cannot tell the conversation format (JSONL with \"messages\" or "
                        "\"conversations\"); give --chat openai|sharegpt|...")
    if re.search(r"^Q:.*\nA:", text[:20_000], re.M):
        return "qa"
    if re.search(r"^- ", text[:20_000], re.M):
        return "dialogue"
    raise DataError(f"{file}: cannot tell the conversation format; give --chat "
                    f"{'|'.join(f for f in FORMATS if f != 'auto')}")


def _add(report: ReadReport, messages: list[dict], group: str | None = None) -> None:
    """Keep a conversation that has something for the assistant to learn (an assistant turn)."""
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a trailing user turn has no answer to learn
    if any(m["role"] == "assistant" for m in messages):
        report.conversations.append(Conversation(messages, group))


# ---- readers -----------------------------------------------------------------------------------------
def _jsonl(file: Path, options: ReadOptions, report: ReadReport, key: str, role_key: str, text_key: str,
           roles: dict[str, str]) -> None:
    for n, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad(where, f"malformed JSON ({e.msg})", options)
            continue
        turns = record.get(key) if isinstance(record, dict) else None
        if not isinstance(turns, list):
            report.bad(where, f'expected an object with a "{key}" list', options)
            continue
        messages = []
        for turn in turns:
            role = roles.get(turn.get(role_key)) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get(text_key), str):
                messages = None
                break
            messages.append({"role": role, "content": turn[text_key]})
        if messages is None:
            report.bad(where, f'each turn needs "{role_key}" ({"/".join(roles)}) and a "{text_key}" string', options)
            continue
        _add(report, messages)


def read_openai(file, options, report):
    _jsonl(file, options, report, "messages", "role", "content", {r: r for r in ("system", "user", "assistant")})


def read_sharegpt(file, options, report):
    _jsonl(file, options, report, "conversations", "from", "value", SHAREGPT_ROLES)


def read_columns(file: Path, options: ReadOptions, report: ReadReport) -> None:
    q, a = options.question, options.answer
    if file.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow's own errors
            raise DataError(f"{file}: cannot read it as Parquet: {str(e).splitlines()[0]}") from None
        names = table.column_names
        rows = table.to_pylist() if q in names and a in names else None
        first_row = 1
    else:
        reader = csv.DictReader(io.StringIO(read_text(file)))
        names = reader.fieldnames or []
        rows = list(reader) if q in names and a in names else None
        first_row = 2  # the header is line 1
    if rows is None:
        raise DataError(f"{file} has no columns {q!r} and {a!r} (it has {', '.join(map(str, names))}); "
                        "name them with --question-column and --answer-column")
    for n, row in enumerate(rows, first_row):
        question, answer = row.get(q), row.get(a)
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip() or not answer.strip():
            report.bad(f"{file}:{n}", f"row without a {q!r} and an {a!r} text", options)
            continue
        _add(report, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def _telegram_text(text) -> str:
    """A message's text: a string, or a list of strings and entities {"type", "text"}."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        return "".join(t if isinstance(t, str) else str(t.get("text", "")) for t in text)
    return ""


def read_telegram(file: Path, options: ReadOptions, report: ReadReport) -> None:
    try:
        export = json.loads(read_text(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: malformed JSON at line {e.lineno} ({e.msg})") from None
    messages = export.get("messages") if isinstance(export, dict) else None
    if not isinstance(messages, list):
        raise DataError(f'{file} is not a Telegram export: no "messages" list')
    senders = {}
    for m in messages:
        if isinstance(m, dict) and m.get("type", "message") == "message":
            senders[str(m.get("from"))] = str(m.get("from_id"))
    me = options.assistant
    if me is None or (me not in senders and me not in senders.values()):
        raise DataError(f"{file}: say which sender is the assistant with --assistant NAME_OR_ID "
                        f"(senders: {', '.join(list(senders)[:5])})")
    gap = options.gap_hours * 3600
    turns, last_time = [], None

    def flush():
        if turns:
            _add(report, [{"role": r, "content": "\n".join(t)} for r, t in turns])
        turns.clear()

    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("type", "message") != "message":
            continue  # service messages: joins, pins, calls
        try:
            when = datetime.fromisoformat(str(m["date"])).timestamp()
        except (KeyError, ValueError):
            report.bad(f"{file}: message {n}", "no readable date", options)
            continue
        text = _telegram_text(m.get("text")).strip()
        if not text:
            continue  # a photo or sticker without a caption
        if last_time is not None and when - last_time > gap:
            flush()
        last_time = when
        role = "assistant" if me in (str(m.get("from")), str(m.get("from_id"))) else "user"
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))
    flush()


def read_dialogue(file: Path, options: ReadOptions, report: ReadReport) -> None:
    for block in re.split(r"\n\s*\n", read_text(file)):
        turns = [line[2:].strip() for line in block.strip().split("\n") if line.startswith("- ")]
        if len(turns) >= 2:
            _add(report, [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])


def read_qa(file: Path, options: ReadOptions, report: ReadReport) -> None:
    text = read_text(file)
    line = 1
    for block in re.split(r"(\n\s*\n)", text):
        if block.strip():
            fields = {}
            for row in block.strip().split("\n"):
                if row[:2] in ("T:", "Q:", "A:"):
                    fields[row[0]] = row[2:].strip()
            if set(fields) == {"T", "Q", "A"}:
                _add(report, [{"role": "user", "content": fields["T"]}, {"role": "user", "content": fields["Q"]},
                              {"role": "assistant", "content": fields["A"]}], group=fields["T"])
            else:
                report.bad(f"{file}:{line}", "a block without its T:, Q: and A: lines", options)
        line += block.count("\n")


READERS = {"openai": read_openai, "sharegpt": read_sharegpt, "columns": read_columns, "telegram": read_telegram,
           "dialogue": read_dialogue, "qa": read_qa}


# ---- masked examples: ids, the loss mask, and each example's (start, end) ------------------------------
def split_by_group(conversations: list[Conversation], val_fraction: float) -> tuple[list, list]:
    """The last val_fraction of the groups (a conversation without one is its own) is validation."""
    groups = list(dict.fromkeys(c.group if c.group is not None else id(c) for c in conversations))
    n_val = max(1, int(len(groups) * val_fraction))
    if len(groups) - n_val < 1:
        raise DataError(f"{len(groups)} conversation group(s) cannot be split into train and validation")
    val_groups = set(groups[-n_val:])
    train = [c for c in conversations if (c.group if c.group is not None else id(c)) not in val_groups]
    val = [c for c in conversations if (c.group if c.group is not None else id(c)) in val_groups]
    return train, val


def write_examples(out: Path, split: str, ids: np.ndarray, mask: np.ndarray, index: np.ndarray, dtype) -> None:
    """{split}.bin (the ids, so the split also serves objective=lm), {split}_mask.bin, {split}_examples.npy."""
    atomic_write_bytes(out / f"{split}.bin", np.asarray(ids, dtype=dtype).tobytes())
    atomic_write_bytes(out / f"{split}_mask.bin", np.asarray(mask, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    np.save(buf, np.asarray(index, dtype=np.int64).reshape(-1, 2))
    atomic_write_bytes(out / f"{split}_examples.npy", buf.getvalue())


def masked_batch(ids: np.ndarray, mask: np.ndarray, index: np.ndarray, which, context_len: int):
    """Examples `which` (rows of index) as (x, y, loss_mask), each (B, T): x the example's ids, y x
    shifted by one, loss_mask true where y is a token to learn. Rows are right-padded. An example
    longer than context_len + 1 is cut at a turn boundary: after the last learned turn that fits, or,
    when not even the first fits, to the window that ends with the first (a long prompt loses its
    start); a first reply longer than the context itself is cut to its start."""
    rows = []
    for i in which:
        start, end = (int(v) for v in index[i])
        row_ids = np.asarray(ids[start:end], dtype=np.int64)
        learn = np.asarray(mask[start:end], dtype=bool)
        if len(row_ids) > context_len + 1:
            row_ids, learn = _cut(row_ids, learn, context_len + 1)
        rows.append((row_ids, learn))
    T = max(1, max(len(r) for r, _ in rows) - 1)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (row, learn) in enumerate(rows):
        n = len(row) - 1
        x[b, :n] = torch.from_numpy(row[:-1])
        y[b, :n] = torch.from_numpy(row[1:])
        loss_mask[b, :n] = torch.from_numpy(learn[1:])
    return x, y, loss_mask


def packed_batch(ids: np.ndarray, mask: np.ndarray, index: np.ndarray, draw, batch_size: int, context_len: int):
    """Rows of context_len positions, each holding whole examples one after another, as drawn by
    draw() (an example's row number) until batch_size rows are full; the rest of a row is padding.
    Returns (x, y, loss_mask, documents): documents (B, T) numbers the examples of each row, for the
    block-diagonal attention that keeps them apart (model.document_positions); y is -100 on padding,
    and no example's last token is asked to predict the next example."""
    x = torch.zeros(batch_size, context_len, dtype=torch.long)
    y = torch.full((batch_size, context_len), -100, dtype=torch.long)
    loss_mask = torch.zeros(batch_size, context_len, dtype=torch.bool)
    documents = torch.zeros(batch_size, context_len, dtype=torch.long)
    row = fill = doc = 0
    for _ in range(100 * batch_size + 1000):
        start, end = (int(v) for v in index[draw()])
        row_ids = np.asarray(ids[start:end], dtype=np.int64)
        learn = np.asarray(mask[start:end], dtype=bool)
        if len(row_ids) > context_len + 1:
            row_ids, learn = _cut(row_ids, learn, context_len + 1)
        n = len(row_ids) - 1
        if n < 1:
            continue
        if fill + n > context_len:  # the row is full: pad it (a document of its own) and go on
            documents[row, fill:] = doc
            row, fill, doc = row + 1, 0, 0
            if row == batch_size:
                return x, y, loss_mask, documents
        x[row, fill:fill + n] = torch.from_numpy(row_ids[:-1])
        y[row, fill:fill + n] = torch.from_numpy(row_ids[1:])
        loss_mask[row, fill:fill + n] = torch.from_numpy(learn[1:])
        documents[row, fill:fill + n] = doc
        fill, doc = fill + n, doc + 1
    raise DataError("the examples are too short to fill a packed batch (one token each?)")


def _cut(ids: np.ndarray, learn: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `size` tokens of an example, cut at the end of a learned turn."""
    ends = np.flatnonzero(learn[:-1] & ~learn[1:]) + 1
    ends = np.append(ends, len(learn)) if learn[-1] else ends
    if len(ends) == 0:
        return ids[:size], learn[:size]
    if ends[0] <= size:
        cut = int(ends[ends <= size][-1])
        return ids[:cut], learn[:cut]
    first_end, first_start = int(ends[0]), int(np.flatnonzero(learn)[0])
    begin = first_end - size
    if begin >= first_start:  # the first reply alone is longer than the context: its start is learned
        return ids[:size], learn[:size]
    return ids[begin:first_end], learn[begin:first_end]
